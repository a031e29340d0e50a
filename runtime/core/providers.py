"""ONNX Runtime's execution providers: which to ask for, keeping their loading noise quiet, and saying why one that
was asked for did not load (ONNX Runtime falls back silently). The one place the runtime diagnoses providers."""

from __future__ import annotations

import contextlib
import ctypes
import io
import sys
from pathlib import Path

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "auto": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
QUIET, VERBOSE = 4, 1  # ONNX Runtime log severities: fatal only; info and up
_LIBRARIES = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
              "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}


def why_not_loadable(ort, provider: str) -> str | None:
    """Load the provider's shared library ourselves: its loader error says what is missing (a CUDA library...)."""
    library = _LIBRARIES.get(provider)
    if library is None:
        return None
    path = Path(ort.__file__).parent / "capi" / library
    if not path.is_file():
        return f"{library} is not part of this onnxruntime installation"
    try:
        ctypes.CDLL(str(path))
    except OSError as e:
        return str(e).replace(f"{path}: ", "")
    return None


@contextlib.contextmanager
def quiet_ort(verbose: bool):
    """Keep ONNX Runtime's provider-loading noise out of the output unless `verbose`: its C++ log (onnxruntime-gpu
    logs every provider library it fails to load) and its Python 'EP Error ... Falling back' lines, which go to
    stdout. Failures that matter still surface: the backend raises a UserError when a requested provider did not
    load. verbose: ONNX Runtime's log goes to stderr, from severity info up."""
    try:
        import onnxruntime as ort
    except ImportError:
        yield
        return
    ort.set_default_logger_severity(VERBOSE if verbose else QUIET)
    with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
        yield
