"""The serving environment: a venv for tritonserver and its python-backend stub, made on first use.

A venv of its own because the only Triton that installs here, tritonserver 2.51 inside the nvidia-pytriton 0.7.0
wheel, has a python-backend stub built against numpy 1.x: under numpy 2 it corrupts tensors ([1,2,3,4] arrives as
[1,1,1,1]). So this venv pins numpy 1.26 and gets the runtime from the checkout without its numpy-2 pin (the runtime
runs on both). The stub must also load the libpython of the very Python it runs (a pyenv 3.11.7 stub against
Debian's 3.11.2 libpython failed at model load): the venv is made from the Python running this code, and that
Python's own shared libpython goes first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.files import write_atomic

SERVING_PINS = ("nvidia-pytriton==0.7.0", "tritonclient[grpc,http]==2.73.0", "numpy==1.26.4")
STAMP = "healthgpt-serving.json"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


def checkout() -> Path:
    """The source checkout this runtime runs from (the serving venv installs the runtime from it)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise UserError(f"the runtime at {root / 'runtime'} is not in a source checkout (no pyproject.toml); "
                        "serving installs the runtime from a checkout of healthgpt-edge")
    return root


def requirements(root: Path) -> list[str]:
    """The runtime's own pinned dependencies from pyproject.toml, numpy swapped for the stub's 1.26, plus Triton."""
    try:
        import tomllib
    except ImportError:
        raise UserError("serving needs Python 3.11 or newer (tomllib reads the runtime's pins)") from None
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.replace(" ", "").lower().startswith("numpy")] + list(SERVING_PINS)


@dataclass(frozen=True)
class Environment:
    venv: Path
    python: Path
    tritonserver: Path
    backends: Path  # --backend-directory: python/ with libtriton_python.so, the utils and this Python's stub
    libs: tuple[Path, ...]  # LD_LIBRARY_PATH entries: this Python's libpython dir, then the wheel's libraries

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # the stub's Python first
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, self.libs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PYTHONNOUSERSITE"] = "1"
        env.pop("PYTHONPATH", None)  # the stub imports the runtime installed in the venv, nothing else
        return env


def default_venv() -> Path:
    return checkout() / ".venv-serving"


def ensure(venv: Path | None = None, log=print) -> Environment:
    """Create or update the serving venv (once per set of pins; a lock keeps concurrent callers out of each other's
    way) and assemble tritonserver's backend folder in it."""
    root = checkout()
    venv = (venv or default_venv()).resolve()
    reqs = requirements(root)
    want = {"requirements": reqs, "checkout": str(root)}
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = venv / "bin" / "python"
        if _read_json(venv / STAMP) != want:
            log(f"[I] preparing the serving environment {venv} (first use: a few minutes)")
            if not python.exists():
                _run([_base_python(), "-m", "venv", str(venv)], "create the serving venv")
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            _run([*pip, *reqs], "install the serving dependencies")
            _run([*pip, "--no-deps", "-e", str(root)], "install the runtime into the serving venv")
            (venv / STAMP).unlink(missing_ok=True)
            shutil.rmtree(venv / "triton", ignore_errors=True)  # reassembled below from the new wheel
            _write_json(venv / STAMP, want)
        return _assemble(venv, python)


def _assemble(venv: Path, python: Path) -> Environment:
    facts = json.loads(subprocess.run(
        [str(python), "-c", "import json, sys, sysconfig, pytriton; print(json.dumps({"
         "'version': '%d.%d' % sys.version_info[:2], 'shared': sysconfig.get_config_var('Py_ENABLE_SHARED'), "
         "'libdir': sysconfig.get_config_var('LIBDIR'), 'pytriton': pytriton.__path__[0]}))"],
        capture_output=True, text=True, check=True).stdout)
    if not facts["shared"]:
        raise UserError(f"{python} was built without a shared libpython, which the Triton python-backend stub "
                        "needs; make the serving venv from a Python built with --enable-shared")
    wheel = Path(facts["pytriton"]) / "tritonserver"
    stub = wheel / "python_backend_stubs" / facts["version"] / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no python-backend stub for Python {facts['version']} ({stub})")
    backends = venv / "triton" / "backends"
    if not (backends / "python" / stub.name).is_file():
        tmp = venv / "triton.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "backends" / "python").mkdir(parents=True)
        for src in (*(wheel / "backends" / "python" / f for f in BACKEND_FILES), stub):
            shutil.copy2(src, tmp / "backends" / "python" / src.name)
        shutil.rmtree(venv / "triton", ignore_errors=True)
        os.replace(tmp, venv / "triton")
    return Environment(venv, python, wheel / "bin" / "tritonserver", backends,
                       (Path(facts["libdir"]), Path(facts["pytriton"]).parent / "nvidia_pytriton.libs"))


def _base_python() -> str:
    """The interpreter behind the running one (a venv's python is a link to it): its libpython is the stub's."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])  # one error line
        raise UserError(f"could not {what} (`{' '.join(cmd[:6])} ...` exited {done.returncode}): {tail}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=1))
