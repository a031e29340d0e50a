"""ONNX Runtime GenAI, the peer that runs outside this process.

onnxruntime-genai depends on the CPU `onnxruntime` package, which must never be installed into the project's .venv
(it holds onnxruntime-gpu; two packages providing the `onnxruntime` module break each other). So GenAI lives in its
own venv, $HGB_GENAI_VENV (default /tmp/genai-venv), created here when missing:

    python -m venv /tmp/genai-venv
    /tmp/genai-venv/bin/pip install onnxruntime-genai==0.18.0 transformers==5.23.0
    + a .pth file that appends the project's .venv site-packages (torch, onnx, onnx_ir for the model builder),
      AFTER the venv's own site-packages, so `import onnxruntime` there finds the CPU package, never ours.

(The builder of 0.18 imports model classes that need transformers >= 5; the project's .venv pins 4.57, so the
genai venv has its own transformers, found first.) Model builder outputs are cached next to the other artifacts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from benchmarks.artifacts import Model, cache_root, checkpoint, log

GENAI_VERSION = "0.18.0"
TRANSFORMERS_FOR_BUILDER = "5.23.0"
WORKER = Path(__file__).with_name("genai_worker.py")


def venv_dir() -> Path:
    return Path(os.environ.get("HGB_GENAI_VENV", "/tmp/genai-venv"))


def genai_python() -> Path | str:
    """The GenAI venv's python, creating the venv if missing; or 'not run: reason'."""
    venv = venv_dir()
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import onnxruntime_genai, onnxruntime, transformers, torch; "
                            "print(onnxruntime.__file__)"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    log(f"creating the ONNX Runtime GenAI venv {venv} (onnxruntime-genai needs the CPU onnxruntime package, which "
        f"must stay out of .venv); this downloads ~60 MB from PyPI once")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"onnxruntime-genai=={GENAI_VERSION}",
                        f"transformers=={TRANSFORMERS_FOR_BUILDER}"], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        ours = sysconfig.get_paths()["purelib"]  # this (the project's) venv: torch, onnx, onnx_ir
        (Path(site) / "zz_project_venv.pth").write_text(ours + "\n")
        check = subprocess.run(probe, capture_output=True, text=True)
        if check.returncode != 0:
            return f"not run: GenAI venv {venv} is unusable: {check.stderr.strip().splitlines()[-1][:200]}"
        if str(venv) not in check.stdout:
            return f"not run: GenAI venv {venv} imports onnxruntime from {check.stdout.strip()}, not its own"
    except (subprocess.CalledProcessError, OSError) as e:
        return f"not run: could not create the GenAI venv {venv} ({e}); see benchmarks/peers.py for the steps"
    return py


def build(model: Model, precision: str) -> Path | str:
    """Model builder output of the plain base model (fp32 or int4) for CPU, cached; or 'not run: reason'."""
    out = cache_root(model) / f"genai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    return build_from(checkpoint(model) / "Phi-3-mini-4k-instruct", out, precision)


def build_from(base: Path, out: Path, precision: str) -> Path | str:
    """`base` (an HF Phi-3 folder) through GenAI's model builder into `out` (kept: reused when complete)."""
    if (out / "genai_config.json").is_file():
        return out
    py = genai_python()
    if isinstance(py, str):
        return py
    config = json.loads((base / "config.json").read_text())
    if config.get("original_max_position_embeddings") != config.get("max_position_embeddings"):
        return ("not run: the builder would take the LongRoPE path: original_max_position_embeddings != "
                "max_position_embeddings in the synthetic base's config.json")
    tmp = out.with_name(out.name + ".partial")
    start = time.perf_counter()
    cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(tmp), "-p", precision,
           "-e", "cpu", "-c", str(tmp / "hf-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        killed = f", killed by signal {-proc.returncode}" if proc.returncode < 0 else ""
        return f"not run: model builder failed{killed} ({tail[0][:200]})"
    import shutil

    shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"GenAI {precision} model {out} in {time.perf_counter() - start:.0f}s")
    return out


def run(model: Path, threads: int, contexts: list[int], prefill: int, warmup: int, reps: int,
        max_length: int) -> dict | str:
    """Time GenAI in a subprocess of its venv; the parsed JSON or 'not run: reason'."""
    py = genai_python()
    if isinstance(py, str):
        return py
    args = {"model": str(model), "threads": threads, "contexts": contexts, "prefill": prefill, "warmup": warmup,
            "reps": reps, "max_length": max_length}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([str(py), str(WORKER), json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"not run: GenAI worker failed ({tail[0][:200]})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes(model: Path) -> int:
    """Bytes of the decoder's initializers (embedding table excluded: decode gathers one row)."""
    import onnx

    m = onnx.load(str(model / "model.onnx"), load_external_data=False)
    total = 0
    for init in m.graph.initializer:
        if "embed_tokens" in init.name:
            continue
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data)
    return total
