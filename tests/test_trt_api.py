"""The TensorRT path against TensorRT 11.4's real Python API (issue 24, class 8), without TensorRT installed: the
bindings wheel (tensorrt-cu12-bindings, 1.3 MB) is downloaded once into ~/.cache/healthgpt-edge/wheels; the names its
module defines are the NUL-terminated identifiers in tensorrt.so (a linker may keep "serialize" as the tail of
"deserialize", so a name counts when it ends such a string) and what its __init__.py defines. Every `trt.*` name and
every method the code calls on TensorRT objects must be among them, and the emulation in test_backend_trt.py may offer
no public name TensorRT lacks. Skipped, with pip's reason, where the wheel cannot be fetched."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_backend_trt import OrtContext, OrtEngine, emulated_trt  # noqa: F401 - emulated_trt is a fixture

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "tensorrt-cu12-bindings==11.4.0.106"
CACHE = Path.home() / ".cache" / "healthgpt-edge" / "wheels"
# Per file: the expressions that hold TensorRT objects (the module, an engine, a context, a builder config).
RECEIVERS = {"runtime/core/backend_trt.py": ("trt", "engine", "self.engine", "self.context", "g.context", "self.trt"),
             "engines/build.py": ("trt", "config")}


@pytest.fixture(scope="module")
def tensorrt_names() -> set[str]:
    wheels = sorted(CACHE.glob("tensorrt_cu12_bindings-11.4.0.106-*.whl"))
    if not wheels:
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--disable-pip-version-check", "-q", "-d", str(CACHE), WHEEL],
                                  capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {WHEEL} timed out (no network?)")
        wheels = sorted(CACHE.glob("tensorrt_cu12_bindings-11.4.0.106-*.whl"))
        if not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel for this platform"])[-1]
            pytest.skip(f"cannot fetch {WHEEL}: {reason}")
    with zipfile.ZipFile(wheels[0]) as whl:
        binary = whl.read("tensorrt_bindings/tensorrt.so")
        init = whl.read("tensorrt_bindings/__init__.py").decode()
    idents = {m.decode() for m in re.findall(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]{0,127}(?=\x00)", binary)}
    names = {s[i:] for s in idents for i in range(len(s))}  # tails: merged string literals
    tree = ast.parse(init)
    names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert {"ICudaEngine", "IExecutionContext", "execute_async_v3", "BuilderFlag"} <= names  # the reading works
    return names


def _chain(node: ast.AST) -> list[str] | None:
    """a.b().c -> ['a', 'b', 'c']; None when the root is not a plain name."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = _chain(node.value)
        return None if base is None else [*base, node.attr]
    if isinstance(node, ast.Call):
        return _chain(node.func)
    return None


def used_names(path: str, receivers: tuple[str, ...]) -> dict[str, int]:
    """Every attribute name taken from a TensorRT object in `path`, with a line it is used on."""
    used = {}
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        for receiver in receivers:
            parts = receiver.split(".")
            if chain and chain[:len(parts)] == parts and len(chain) > len(parts):
                for name in chain[len(parts):]:
                    used.setdefault(name, node.lineno)
    return used


def test_every_tensorrt_name_the_code_uses_exists_in_tensorrt_11_4(tensorrt_names):
    missing, seen = [], 0
    for path, receivers in RECEIVERS.items():
        used = used_names(path, receivers)
        seen += len(used)
        missing += [f"{path}:{line}: {name}" for name, line in used.items()
                    if name not in tensorrt_names and name != "__version__"]
    assert seen >= 15 and missing == []


def test_the_emulation_offers_no_name_tensorrt_lacks(tensorrt_names, emulated_trt):  # noqa: F811
    trt = sys.modules["tensorrt"]
    offered = {n for n in vars(trt) if not n.startswith("_")}
    offered |= set(vars(trt.ExecutionContextAllocationStrategy))
    for cls in (OrtEngine, OrtContext):  # the ICudaEngine and IExecutionContext stand-ins
        offered |= {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
    offered |= {"num_io_tensors", "device_memory_size_v2"}  # OrtEngine's properties, set in __init__
    assert offered - tensorrt_names == set()
