"""Image input/output for the runtime: load (Pillow formats and DICOM), pad to square, CLIP preprocessing, save PNG.

Torch-free on purpose, so a host that only drives an engine needs numpy, Pillow and pydicom. `preprocess` is
bit-identical to the reference: `expand2square`, then transformers' slow `CLIPImageProcessor` configured as
openai/clip-vit-large-patch14-336 (reference notes §1.4; checked by tests/test_image.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import UserError

# openai/clip-vit-large-patch14-336 preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 336
RESAMPLE = Image.Resampling.BICUBIC  # == 3
RESCALE = 1 / 255
# The reference pads with tuple(int(x*255) for x in image_mean): int() truncates, giving (122, 116, 104).
FILL = tuple(int(x * 255) for x in CLIP_MEAN)

_MEAN32 = np.array(CLIP_MEAN, dtype=np.float32)
_STD32 = np.array(CLIP_STD, dtype=np.float32)
_DICOM_SUFFIXES = (".dcm", ".dicom")
# pip names for the dependencies pydicom reports as missing, where they differ from the import name.
_PIP_NAMES = {"gdcm": "python-gdcm"}


class _Upload(io.BytesIO):
    """A file's bytes (e.g. a server request's image), read like the file: messages name it by its size."""

    suffix = ""  # no name, so DICOM is recognised by its magic only

    def __str__(self) -> str:
        return f"image ({len(self.getbuffer())} bytes)"


def load_image(path, *, frame: int | None = None, window: tuple[float, float] | None = None) -> Image.Image:
    """Read a PNG/JPEG/TIFF/BMP (or any Pillow format) or a DICOM file as an RGB image.

    path: the file, or its bytes. frame: index into a multi-frame file (default 0). window: (center, width) for
    monochrome DICOM, in modality units (e.g. Hounsfield units for CT); default: the file's first
    WindowCenter/WindowWidth, else the data's min/max.
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        path = _Upload(path)
        head = path.getvalue()[:132]
    else:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    has_magic = head[128:132] == b"DICM"
    if has_magic or path.suffix.lower() in _DICOM_SUFFIXES:
        return _load_dicom(path, frame, window, force=not has_magic)
    if window is not None:
        raise UserError(f"{path}: a display window applies only to DICOM images, and this is not a DICOM file")
    return _load_pillow(path, frame)


def _frame_index(path: Path, frame: int | None, n_frames: int) -> int:
    if frame is None:
        return 0
    if not 0 <= frame < n_frames:
        raise UserError(f"{path}: frame {frame} is out of range: the file has {n_frames} frame(s), "
                        f"valid indices 0..{n_frames - 1}")
    return frame


def _load_pillow(path: Path, frame: int | None) -> Image.Image:
    try:
        with Image.open(path) as im:
            index = _frame_index(path, frame, getattr(im, "n_frames", 1))
            if index:
                im.seek(index)
            return im.convert("RGB")  # as the reference demos do (a 16-bit grey PNG saturates here, as there)
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file Pillow can read (PNG, JPEG, TIFF, BMP, ...) "
                        "and not DICOM (no 'DICM' magic, no .dcm suffix)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying truncated/corrupt
        raise UserError(f"{path}: corrupt or truncated image: {e}") from None


def _install_hint(decoder) -> str:
    """Turn pydicom's 'gdcm - requires gdcm>=3.0.10' lines into pip commands."""
    cmds = []
    for line in decoder.missing_dependencies:
        needs = line.split("requires", 1)[-1].split(" and ")
        names = [re.match(r"\s*([A-Za-z0-9_.\-]+)", n).group(1) for n in needs if n.strip()]
        names = [_PIP_NAMES.get(n, n) for n in names if n != "numpy"]
        if names:
            cmds.append("`pip install " + " ".join(names) + "`")
    return ("to decode it, install one of: " + " or ".join(cmds)) if cmds else \
        "convert it to an uncompressed transfer syntax first (e.g. `gdcmconv --raw` or `dcmdjpeg`)"


def _first(value) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _functional_group(ds, index: int, sequence: str):
    """Enhanced multi-frame files keep rescale and window per frame (or shared) in functional groups."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and i < len(items) and items[i].get(sequence):
            return items[i].get(sequence)[0]
    return None


def _load_dicom(path: Path, frame: int | None, window, *, force: bool) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array

    try:
        ds = pydicom.dcmread(path, force=force)
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as e:
        raise UserError(f"{path}: not a readable DICOM file: {e}") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        what = f"a '{sop.name}' object" if sop else "this file"
        raise UserError(f"{path}: DICOM file has no pixel data: {what} holds no image (or the file is truncated)")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise UserError(f"{path}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None
    index = _frame_index(path, frame, n_frames)

    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta and ds.original_encoding[0] is not None:
        # A bare dataset without file meta (read via the .dcm suffix) is native; say which native encoding.
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                  pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    ts = meta.get("TransferSyntaxUID")
    if ts is None:
        raise UserError(f"{path}: DICOM file meta has no Transfer Syntax UID, so its pixel encoding is unknown")
    syntax = f"transfer syntax '{ts.name}' ({ts})"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UserError(f"{path}: pydicom cannot decode {syntax}; convert the file to an uncompressed "
                        "transfer syntax first (e.g. `gdcmconv --raw`)") from None
    if not decoder.is_available:
        raise UserError(f"{path}: no installed decoder handles {syntax}; {_install_hint(decoder)}")
    try:  # pydicom converts YBR_FULL/YBR_FULL_422 (and the JPEG 2000 colour transforms) to RGB here
        arr = pixel_array(ds, index=index if n_frames > 1 else None)
    except RuntimeError as e:  # every installed plugin failed on this data (e.g. Pillow on 12-bit JPEG)
        detail = " ".join(str(e).split())
        raise UserError(f"{path}: cannot decode {syntax}: {detail}; {_install_hint(decoder)}") from None
    except (ValueError, AttributeError, NotImplementedError, KeyError) as e:  # truncated or inconsistent
        raise UserError(f"{path}: corrupt or truncated DICOM pixel data: {' '.join(str(e).split())}") from None

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = _to_uint8(apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
    elif arr.ndim == 3:  # colour: no VOI windowing in DICOM, just scale the stored bit depth to 8 bits
        rgb = _to_uint8(arr, int(ds.get("BitsStored") or arr.dtype.itemsize * 8))
    else:
        rgb = None
    if rgb is not None:
        if window is not None:
            raise UserError(f"{path}: a display window applies only to monochrome images; this one is {photometric}")
        return Image.fromarray(np.ascontiguousarray(rgb))

    rescale = ds if ("RescaleSlope" in ds or "ModalityLUTSequence" in ds) else \
        _functional_group(ds, index, "PixelValueTransformationSequence")
    values = np.asarray(apply_modality_lut(arr, rescale) if rescale is not None else arr, dtype=np.float64)
    if window is not None:
        center, width = (float(v) for v in window)
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise UserError(f"window {window!r}: need a finite center and a width > 0")
    else:
        voi = ds if "WindowCenter" in ds else _functional_group(ds, index, "FrameVOILUTSequence")
        center = width = None
        if voi is not None and voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None:
            center, width = _first(voi.WindowCenter), _first(voi.WindowWidth)
        if width is None or not width > 0:  # no usable window in the file: stretch the data's range
            lo, hi = float(values.min()), float(values.max())
            center, width = (lo + hi) / 2, (hi - lo) or 1.0
    grey = _window(values, center, width)
    if photometric == "MONOCHROME1":  # low values are bright
        grey = 255 - grey
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: center - width/2 -> 0, center + width/2 -> 255, clipped, rounded to nearest."""
    scaled = (values - (center - width / 2)) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)


def expand2square(img: Image.Image) -> Image.Image:
    """The reference `expand2square` with its fill colour: pad to max(W, H), original pasted floor-centred."""
    if img.mode != "RGB":  # the reference only ever sees RGB; an RGB fill tuple needs an RGB canvas
        img = img.convert("RGB")
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), FILL)
    result.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def preprocess(img: Image.Image) -> np.ndarray:
    """expand2square + CLIPImageProcessor (336): float32 [1, 3, 336, 336], bit-identical to transformers."""
    img = expand2square(img)
    # HF resizes the shortest edge to 336 through PIL on uint8; the image is square, so that is (336, 336) and the
    # 336 centre crop is a no-op. PIL returns an unresampled copy when the size already matches, as in HF.
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), resample=RESAMPLE)
    # HF rescale: upcast to float64, multiply by the Python float 1/255, then downcast to float32.
    x = (np.asarray(img).astype(np.float64) * RESCALE).astype(np.float32)
    # HF normalize: float32 (x - mean) / std, channels last, then transposed to CHW.
    x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def png_bytes(array) -> bytes:
    """A uint8 HxWx3 array as PNG file contents."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"png_bytes wants a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(out, format="PNG")
    return out.getvalue()


def save_png(image, path) -> None:
    """Write a uint8 HxWx3 array (or PNG bytes, e.g. from a server) as PNG atomically: temp file in the same
    folder, then os.replace."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: images are saved as PNG only (lossless); use a .png file name")
    data = image if isinstance(image, bytes) else png_bytes(image)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # a plain open keeps the umask's permissions (mkstemp would force 0600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):  # only left behind when something above failed
            tmp.unlink()
