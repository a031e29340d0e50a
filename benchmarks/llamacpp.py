"""llama.cpp, the peer built from source here, in a venv of its own: $HGB_LLAMA_VENV (default /tmp/llama-venv).

    pip download llama-cpp-python==0.3.36 --no-binary :all:     # the source package; its vendor/ holds llama.cpp
    python -m venv VENV && VENV/bin/pip install SRC SRC/vendor/llama.cpp/gguf-py sentencepiece
        (CMAKE_ARGS=-DGGML_NATIVE=ON: compiled for this CPU, ~15 min on 2 cores)
    + a .pth that appends the project's .venv site-packages (torch for convert_hf_to_gguf.py), after its own

A Phi-3 folder is converted by llama.cpp's own convert_hf_to_gguf.py (bf16: the synthetic weights are bf16, so
nothing is rounded) and quantized to Q4_0 / Q8_0 through llama-cpp-python's `llama_model_quantize`. Everything is
run by `llamacpp_worker.py` inside the venv; each step returns a path or 'not run: reason'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.artifacts import log

VERSION = "0.3.36"
WORKER = Path(__file__).with_name("llamacpp_worker.py")


def venv_dir() -> Path:
    return Path(os.environ.get("HGB_LLAMA_VENV", "/tmp/llama-venv"))


def _run(cmd: list[str], what: str, **kw) -> str | None:
    """None when `cmd` succeeded, else 'not run: reason'."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode == 0:
        return None
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"not run: {what} failed ({tail[0][:200]})"


def llama_python() -> Path | str:
    """The llama.cpp venv's python, building llama-cpp-python from source when missing; or 'not run: reason'."""
    venv = venv_dir()
    py, src = venv / "bin" / "python", venv / "src"
    if py.is_file() and _run([str(py), "-c", "import llama_cpp, gguf, sentencepiece, torch"], "probe") is None:
        return py
    log(f"building llama-cpp-python {VERSION} from source into {venv} (~15 min on 2 cores)")
    steps = [([sys.executable, "-m", "venv", "--clear", str(venv)], "venv", {}),
             ([str(venv / "bin" / "pip"), "download", "-q", f"llama-cpp-python=={VERSION}", "--no-binary", ":all:",
               "--no-deps", "-d", str(venv / "sdist")], "download", {}),
             (["tar", "xzf", str(venv / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"), "-C", str(venv)], "unpack",
              {}),
             (["mv", str(venv / f"llama_cpp_python-{VERSION}"), str(src)], "unpack", {}),
             ([str(venv / "bin" / "pip"), "install", "-q", str(src), str(src / "vendor/llama.cpp/gguf-py"),
               "sentencepiece"], "build", {"env": {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}})]
    for cmd, what, kw in steps:
        if (failed := _run(cmd, what, **kw)) is not None:
            return failed
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def worker(request: dict) -> dict | str:
    """Runs llamacpp_worker.py in the venv with `request`; its JSON answer or 'not run: reason'."""
    py = llama_python()
    if isinstance(py, str):
        return py
    proc = subprocess.run([str(py), str(WORKER), json.dumps(request)], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return f"not run: llama.cpp worker failed ({tail[0][:200]})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gguf(base: Path, out_dir: Path, kind: str) -> Path | str:
    """`base` (an HF Phi-3 folder) as GGUF: kind 'bf16' (converted) or a quantization of it ('Q4_0', 'Q8_0');
    kept in out_dir and reused."""
    out = out_dir / f"model-{kind}.gguf"
    if out.is_file():
        return out
    if kind == "bf16":
        py = llama_python()
        if isinstance(py, str):
            return py
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        failed = _run([str(py), str(venv_dir() / "src/vendor/llama.cpp/convert_hf_to_gguf.py"), str(base),
                       "--outfile", str(tmp), "--outtype", "bf16"], "convert_hf_to_gguf.py")
        if failed is None:
            tmp.rename(out)
        return failed or out
    source = gguf(base, out_dir, "bf16")
    if isinstance(source, str):
        return source
    answer = worker({"op": "quantize", "src": str(source), "dst": str(out), "type": kind})
    return answer if isinstance(answer, str) else out
