"""Generated images out: PNG only (lossless), written atomically, the path checked before the work that makes it."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.contract.errors import UserError
from runtime.contract.files import atomic_write


def _png_name(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: images are saved as PNG only (lossless); use a .png file name")
    return path


def check_png_path(path) -> None:
    """Refuse a path `save_png` could not write, before the work that makes the image: a .png name, not a folder,
    whose nearest existing folder takes a new file (probed with a temp file, removed again; no folder is created)."""
    path = _png_name(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the PNG file to write")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UserError(f"{path}: cannot write into {folder}: {e.strerror or e}") from None


def png_bytes(array) -> bytes:
    """A uint8 HxWx3 array as PNG file contents."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"png_bytes wants a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(out, format="PNG")
    return out.getvalue()


def save_png(image, path) -> None:
    """Write a uint8 HxWx3 array (or PNG bytes, e.g. from a server) as PNG, atomically."""
    path = _png_name(path)
    data = image if isinstance(image, bytes) else png_bytes(image)
    with atomic_write(path) as f:
        f.write(data)
