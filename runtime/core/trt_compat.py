"""Which GPU and TensorRT version an engine was built for, and the check that refuses an engine built for others.

TensorRT engines are not portable across GPU architectures or TensorRT versions (anchors.md: "engine plan file is
generated on an incompatible device"), so every engine's manifest entry records both and the runtime calls
`check_compat` before it deserializes anything. `tensorrt` and the CUDA runtime are imported only inside
`current_device()`; everything else here is plain data and runs anywhere.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.manifest import EngineEntry

INSTALL_HINT = "TensorRT is not installed: pip install '.[tensorrt]'"
CC_MAJOR, CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor (CUDA runtime API, cudaDeviceAttr)


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "NVIDIA H200"
    compute_capability: str  # "major.minor", e.g. "9.0"
    tensorrt_version: str  # tensorrt.__version__, e.g. "10.8.0.43"


def current_device() -> DeviceInfo:
    """The GPU this process runs on (CUDA device 0 of those visible) and the installed TensorRT."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    name, cc = cuda_device()
    return DeviceInfo(name, cc, trt.__version__)


def cuda_device() -> tuple[str, str]:
    """Name and compute capability of the current CUDA device, asked through the CUDA runtime library that
    Polygraphy's ctypes wrapper loads (no torch, no pycuda)."""
    try:
        from polygraphy import cuda

        cudart = cuda.wrapper().handle
    except (ImportError, OSError) as e:
        raise UserError(f"no CUDA GPU visible: the CUDA runtime library could not be loaded ({e}); install the "
                        "NVIDIA driver and pip install '.[tensorrt]'") from None
    count, dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        raise UserError(f"no CUDA GPU visible (cudaGetDeviceCount: status {status}, {count.value} devices): "
                        "check the NVIDIA driver and CUDA_VISIBLE_DEVICES")
    cudart.cudaGetDevice(ctypes.byref(dev))
    cudart.cudaDeviceGetAttribute(ctypes.byref(major), CC_MAJOR, dev)
    cudart.cudaDeviceGetAttribute(ctypes.byref(minor), CC_MINOR, dev)
    props = ctypes.create_string_buffer(8192)  # a cudaDeviceProp (about 1 KiB); `name` (char[256]) is its first field
    get_props = getattr(cudart, "cudaGetDeviceProperties_v2", None) or cudart.cudaGetDeviceProperties
    name = props.raw[:256].split(b"\0")[0].decode(errors="replace") if get_props(props, dev) == 0 else "unknown GPU"
    return name, f"{major.value}.{minor.value}"


def check_compat(entry: EngineEntry, device: DeviceInfo, bundle: str | Path = "BUNDLE") -> list[str]:
    """Refuse an engine built for another compute capability or TensorRT version (UserError saying how to rebuild).
    Returns notes that do not stop it: the same architecture under another GPU name runs, maybe not at its best."""
    built = (entry.compute_capability, entry.tensorrt_version)
    if built != (device.compute_capability, device.tensorrt_version):
        raise UserError(f"engine {entry.graph} was built for compute capability {built[0]} "
                        f"with TensorRT {built[1]}; this machine has {device.compute_capability} / "
                        f"{device.tensorrt_version}: rebuild with `python build.py engines --bundle {bundle}`")
    if entry.gpu_name and entry.gpu_name != device.name:
        return [f"engine {entry.graph} was built on a {entry.gpu_name} and runs on a "
                f"{device.name} (same compute capability {device.compute_capability}); its kernels were timed on the "
                f"other GPU: rebuild with `python build.py engines --bundle {bundle}` for best speed"]
    return []
