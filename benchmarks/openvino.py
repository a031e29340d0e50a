"""OpenVINO GenAI, the peer exported by optimum-intel, in a venv of its own: $HGB_OPENVINO_VENV (default /tmp/ov-venv).

    python -m venv VENV
    + a .pth that appends the project's .venv site-packages (torch 2.13 CPU, transformers, tokenizers, sentencepiece,
      numpy for the export), after its own, written BEFORE pip runs so that pip counts them as installed
    VENV/bin/pip install openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0 nncf==3.4.0
                         optimum==2.3.0
    VENV/bin/pip install --no-deps optimum-intel==2.2.0
        (--no-deps: its only requirement not met that way is torchvision, whose PyPI wheel is built against CUDA torch
        and breaks `import transformers` beside the CPU torch; the export does not use it. optimum 2.3.0 in the venv is
        found before the project's 2.1.0, and pip leaves the project's alone: "outside environment".)

A Phi-3 folder is exported by optimum-intel's exporter (`optimum-cli export openvino`, see `export`) to an OpenVINO IR
with int4 weights compressed by NNCF, then timed by `openvino_worker.py` inside the venv; each step returns a path or
'not run: reason'.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.artifacts import log

OPENVINO = "2026.4.1"
GENAI = TOKENIZERS = "2026.4.1.0"
NNCF = "3.4.0"
OPTIMUM = "2.3.0"  # optimum-intel 2.2.0 requires optimum~=2.3.0
OPTIMUM_INTEL = "2.2.0"
WORKER = Path(__file__).with_name("openvino_worker.py")
PROBE = "import openvino, openvino_genai, openvino_tokenizers, nncf, torch, optimum.exporters.openvino"
# what the CLI is given besides --weight-format int4: NNCF's own int4 defaults, spelled out so that optimum-intel does
# not pick a per-model recipe by the folder's name instead (see `export`)
INT4_ARGS = ("--weight-format", "int4", "--group-size", "128", "--ratio", "1.0")


def venv_dir() -> Path:
    return Path(os.environ.get("HGB_OPENVINO_VENV", "/tmp/ov-venv"))


def _run(cmd: list[str], what: str, **kw) -> str | None:
    """None when `cmd` succeeded, else 'not run: reason' (the last line that names an error, or the last line)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except OSError as e:
        return f"not run: {what} failed ({e})"
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
    tail = ([line for line in lines if "Error" in line] or lines)[-1]
    killed = f", killed by signal {-proc.returncode}" if proc.returncode < 0 else ""
    return f"not run: {what} failed{killed} ({tail.strip()[:200]})"


def ov_python() -> Path | str:
    """The OpenVINO venv's python, creating the venv when missing or broken; or 'not run: reason'."""
    venv = venv_dir()
    py, pip = venv / "bin" / "python", str(venv / "bin" / "pip")
    if py.is_file() and _run([str(py), "-c", PROBE], "probe") is None:
        return py
    log(f"creating the OpenVINO venv {venv} (openvino-genai {GENAI}, optimum-intel {OPTIMUM_INTEL}, nncf {NNCF}; "
        f"~450 MB installed, from PyPI once; torch comes from the project's .venv)")
    if (failed := _run([sys.executable, "-m", "venv", "--clear", str(venv)], "venv")) is not None:
        return failed
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    if not site:
        return f"not run: the new venv {venv} has no site-packages"
    (Path(site) / "zz_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for cmd in ([pip, "install", "-q", f"openvino=={OPENVINO}", f"openvino-tokenizers=={TOKENIZERS}",
                 f"openvino-genai=={GENAI}", f"nncf=={NNCF}", f"optimum=={OPTIMUM}"],
                [pip, "install", "-q", "--no-deps", f"optimum-intel=={OPTIMUM_INTEL}"],
                [str(py), "-c", PROBE]):
        if (failed := _run(cmd, "pip install" if cmd[0] == pip else "probe")) is not None:
            return failed
    return py


def export(base: Path, out: Path) -> Path | str:
    """`base` (an HF Phi-3 folder) as an OpenVINO IR with int4 weights in `out` (kept: reused when complete), by

        HF_HUB_OFFLINE=1 TMPDIR=OUT.tmp VENV/bin/optimum-cli export openvino --model BASE \\
            --task text-generation-with-past --weight-format int4 --group-size 128 --ratio 1.0 OUT.partial

    then OUT.partial renamed OUT and OUT.tmp removed. optimum-intel traces the model in its checkpoint dtype (bf16),
    saves that IR (as large as the checkpoint) in a temporary folder under TMPDIR (beside OUT, not in a /tmp that may
    be memory; torch's inductor cache lands there too), reads it back and has NNCF compress the weights
    (nncf.compress_weights, data-free), and converts the tokenizer (openvino_tokenizer.xml, openvino_detokenizer.xml).
    The compression is NNCF's default for int4 (CompressWeightsMode.INT4_ASYM with group_size None -> 128, ratio
    1.0, all_layers False, backup precision INT8_ASYM, no AWQ / scale estimation / GPTQ / dataset):
      - every MatMul weight of the decoder layers (qkv_proj, o_proj, gate_up_proj, down_proj): int4 asymmetric, one
        fp16 scale and one u4 zero point per group of 128 input channels;
      - the token embedding table and the LM head (the "embeddings and last layer"): int8 asymmetric per output
        channel (u8 weights, one u8 zero point and one fp16 scale per row); the norms and the rotary frequencies
        (a 48-value MatMul constant) stay float.
    Group size and ratio are given (INT4_ARGS) although they are the defaults: with `--weight-format int4` and no
    other compression option (or the Python API's {"bits": 4}) optimum-intel uses its own recipe for a model of the
    same name when the folder is called like one, and the full checkpoint's folder is "Phi-3-mini-4k-instruct"
    (recipe: group 64, scale estimation on wikitext2, a download). Without --sym and --backup-precision the CLI
    passes sym=False and no backup precision: NNCF's asymmetric int4 and INT8_ASYM.
    """
    if (out / "openvino_model.xml").is_file() and (out / "openvino_model.bin").is_file():
        return out
    py = ov_python()
    if isinstance(py, str):
        return py
    tmp, scratch = out.with_name(out.name + ".partial"), out.with_name(out.name + ".tmp")
    for folder in (tmp, scratch):
        shutil.rmtree(folder, ignore_errors=True)
    log(f"exporting {base} to OpenVINO int4 in {out}")
    cmd = [str(py.parent / "optimum-cli"), "export", "openvino", "--model", str(base), "--task",
           "text-generation-with-past", *INT4_ARGS, str(tmp)]
    scratch.mkdir(parents=True)
    try:
        failed = _run(cmd, "optimum-cli export openvino", env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "TMPDIR": str(scratch)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failed is None and not (tmp / "openvino_model.xml").is_file():
        failed = f"not run: optimum-cli export openvino wrote no openvino_model.xml in {tmp}"
    if failed is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return failed
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def worker(request: dict) -> dict | str:
    """Runs openvino_worker.py in the venv with `request`; its JSON answer or 'not run: reason'."""
    py = ov_python()
    if isinstance(py, str):
        return py
    env = {**os.environ, "OMP_NUM_THREADS": str(request.get("threads", 1))}
    # -P: the script's folder (benchmarks/, where this file is) must not come first on sys.path, or `import openvino`
    # there finds this module instead of OpenVINO
    proc = subprocess.run([str(py), "-P", str(WORKER), json.dumps(request)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"not run: OpenVINO worker failed ({tail[0][:200]})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes(model: Path) -> int:
    """The IR's weights file: int4 decoder weights with their scales and zero points, and the int8 embedding table and
    LM head (the embedding table counted like llama.cpp's, though a decode step gathers one row of it)."""
    return (model / "openvino_model.bin").stat().st_size


def kv_bytes_per_token(model: Path, kv_cache: dict) -> int:
    """Bytes of K and V one cached token adds, as the CPU plugin stores them for GenAI's paged attention, from the
    precisions the worker reported (kv_cache = {"key": "u8", "value": "u8"}, this CPU's default) and the model's
    config. u8 keys are quantized per channel within each block of 32 tokens (the block holds 32 + 8 rows of
    head_size bytes: the 8 extra rows are a float scale and zero point per channel), u8 values per token (head_size
    bytes + a float scale and zero point); a float precision is head_size elements of its size."""
    config = json.loads((model / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    floats = {"f32": 4, "f16": 2, "bf16": 2}

    def row(kind: str) -> float:
        precision = kv_cache[kind]
        if precision == "u8":
            return head * 40 / 32 if kind == "key" else head + 8
        if precision not in floats:
            raise ValueError(f"KV cache precision {precision} has no byte count here")
        return head * floats[precision]

    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return int(config["num_hidden_layers"] * heads * (row("key") + row("value")))
