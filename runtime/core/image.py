"""Image input for the runtime: read Pillow formats and DICOM (frames, windows) into the 8-bit image the model sees.

Torch-free on purpose, so a host that only drives an engine needs numpy, Pillow and pydicom. What the model then
gets is `runtime.core.clip_input.preprocess` of that image; generated images are written by runtime.core.png.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.contract.errors import UserError
from runtime.contract.files import NotRegularFile, read_regular

_DICOM_SUFFIXES = (".dcm", ".dicom")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEEP_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's grey modes deeper than 8 bits
# pip names for the dependencies pydicom reports as missing, where they differ from the import name.
_PIP_NAMES = {"gdcm": "python-gdcm"}


def check_image_options(has_image: bool, frame: int | None, window, prefix: str = "") -> None:
    """The one refusal of a frame or window without an image (prefix: "--" for command-line options)."""
    if not has_image and (frame is not None or window is not None):
        raise UserError(f"{prefix}frame and {prefix}window need an {prefix}image")


def load_image(path, *, frame: int | None = None, window: tuple[float, float] | None = None) -> Image.Image:
    """Read a PNG/JPEG/TIFF/BMP (or any Pillow format) or a DICOM file as an RGB image.

    path: the file, or its bytes (a server request's image: DICOM is then recognised by its magic). frame: index
    into a multi-frame file (default 0). window: (center, width) for monochrome DICOM, in modality
    units (e.g. Hounsfield units for CT); default: the file's first WindowCenter/WindowWidth, else the data's min/max.
    Images deeper than 8 bits (16-bit PNG, 32-bit or float TIFF) are mapped to 8 bits by their min/max. A flat
    (one colour) or non-finite image is refused: there is nothing in it to ask about.
    """
    if isinstance(path, (bytearray, memoryview)):
        path = bytes(path)
    opened = open_image(path, f"image ({len(path)} bytes)" if isinstance(path, bytes) else None)
    img = opened.frame(frame).render(window)
    pixels = np.asarray(img).reshape(-1, 3)
    if (pixels == pixels[0]).all():  # one colour, grey or not (a 1 x 1 image always is)
        rgb = tuple(int(v) for v in pixels[0])
        raise UserError(f"{opened.name}: the image is one flat colour (every pixel is RGB {rgb}"
                        + (f" with window {window}; try a wider --window" if window else "")
                        + "): there is nothing in it to ask about")
    return img


def open_image(source, name: str | None = None) -> DicomFile | PillowFile:
    """Open a path, or the bytes of an uploaded file called `name`, for decoding frame by frame (`load_image` in
    steps, so that a viewer decodes a frame once and re-windows it as often as it likes). A path is read once,
    whole, and only if it is a regular file."""
    if isinstance(source, bytes):
        name = name or "upload"
    else:
        source, name = _read_regular(Path(source)), str(source)
    has_magic = source[128:132] == b"DICM"
    if has_magic or Path(name).suffix.lower() in _DICOM_SUFFIXES:
        return DicomFile.read(source, name, force=not has_magic)
    return PillowFile(source, name)


def _read_regular(path: Path) -> bytes:
    """The bytes of an image file; a FIFO, device or folder is refused at once (runtime.contract.files)."""
    try:
        return read_regular(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except NotRegularFile as e:
        raise UserError(f"{path}: {e.strerror}: only regular image files are read; give the image file itself") \
            from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


@dataclass(frozen=True)
class Frame:
    """One decoded frame before display. Monochrome DICOM keeps its modality values (e.g. Hounsfield units) and
    the file's own window; anything else is already 8-bit RGB."""

    name: str
    pixels: np.ndarray  # monochrome DICOM: float64 [H, W] modality values; otherwise uint8 [H, W, 3]
    window: tuple[float, float] | None  # monochrome DICOM: the file's (center, width), else the data's range
    photometric: str | None  # None: not DICOM
    monochrome1: bool = False

    def render(self, window: tuple[float, float] | None = None) -> Image.Image:
        """The 8-bit RGB image under `window` (default: the frame's own): what is shown and what the model gets."""
        if self.window is None:
            if window is not None and self.photometric is None:
                raise UserError(f"{self.name}: a display window applies only to DICOM images, and this is not a "
                                "DICOM file")
            if window is not None:
                raise UserError(f"{self.name}: a display window applies only to monochrome images; this one is "
                                f"{self.photometric}")
            return Image.fromarray(self.pixels)
        if window is not None:
            center, width = (float(v) for v in window)
            if not (np.isfinite(center) and np.isfinite(width) and width > 0):
                raise UserError(f"window {window!r}: need a finite center and a width > 0")
        else:
            center, width = self.window
        grey = _window(self.pixels, center, width)
        if self.monochrome1:  # low values are bright
            grey = 255 - grey
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def _frame_index(name: str, frame: int | None, n_frames: int) -> int:
    if frame is None:
        return 0
    if not 0 <= frame < n_frames:
        raise UserError(f"{name}: frame {frame} is out of range: the file has {n_frames} frame(s), "
                        f"valid indices 0..{n_frames - 1}")
    return frame


@contextlib.contextmanager
def _pillow_errors(name: str):
    try:
        yield
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file Pillow can read (PNG, JPEG, TIFF, BMP, ...) "
                        "and not DICOM (no 'DICM' magic, no .dcm suffix)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's ways of saying truncated/corrupt
        raise UserError(f"{name}: corrupt or truncated image: {e}") from None


class PillowFile:
    def __init__(self, data: bytes, name: str):
        self._data, self.name = data, name
        with self._open() as im:
            self.n_frames = getattr(im, "n_frames", 1)

    @contextlib.contextmanager
    def _open(self):
        with _pillow_errors(self.name), Image.open(io.BytesIO(self._data)) as im:
            yield im

    def frame(self, index: int | None = None) -> Frame:
        index = _frame_index(self.name, index, self.n_frames)
        with self._open() as im:
            if index:
                im.seek(index)
            if im.mode in _DEEP_MODES:  # convert("RGB") would saturate them (a 16-bit grey PNG turns white)
                values = np.asarray(im, dtype=np.float64)
                _check_finite(self.name, values)
                grey = _window(values, *_full_range(self.name, values))
                return Frame(self.name, np.repeat(grey[..., None], 3, axis=-1), None, None)
            return Frame(self.name, np.asarray(im.convert("RGB")), None, None)  # as the reference demos do


def _check_finite(name: str, values: np.ndarray) -> None:
    if bad := np.count_nonzero(~np.isfinite(values)):
        raise UserError(f"{name}: {bad} of {values.size} pixel values are NaN or infinite: an image with undefined "
                        "values is refused")


def _full_range(name: str, values: np.ndarray) -> tuple[float, float]:
    """(center, width) of a window over the data's min..max; a flat image has none."""
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        raise UserError(f"{name}: the image is flat: every pixel has the value {lo:g}, so there is nothing in it "
                        "to ask about")
    return (lo + hi) / 2, hi - lo


def _install_hint(decoder) -> str:
    """Turn pydicom's 'gdcm - requires gdcm>=3.0.10' lines into pip commands."""
    cmds = []
    for line in decoder.missing_dependencies:
        needs = line.split("requires", 1)[-1].split(" and ")
        names = [_package_name(n) for n in needs if n.strip()]
        names = [_PIP_NAMES.get(n, n) for n in names if n != "numpy"]
        if names:
            cmds.append("`pip install " + " ".join(names) + "`")
    return ("to decode it, install one of: " + " or ".join(cmds)) if cmds else \
        "convert it to an uncompressed transfer syntax first (e.g. `gdcmconv --raw` or `dcmdjpeg`)"


def _package_name(requirement: str) -> str:
    """'gdcm>=3.0.10' -> 'gdcm'."""
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement)
    assert match is not None, requirement  # pydicom names a package before each version bound
    return match.group(1)


def _first(value) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _functional_group(ds, index: int, sequence: str):
    """Enhanced multi-frame files keep rescale and window per frame (or shared) in functional groups."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and i < len(items) and items[i].get(sequence):
            return items[i].get(sequence)[0]
    return None


class DicomFile:
    """A DICOM file read and checked (pixel data present, a decoder for its transfer syntax); `ds` keeps its tags."""

    def __init__(self, ds, name: str, n_frames: int, syntax: str, decoder):
        self.ds, self.name, self.n_frames = ds, name, n_frames
        self._syntax, self._decoder = syntax, decoder

    @classmethod
    def read(cls, data: bytes, name: str, *, force: bool) -> DicomFile:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import get_decoder

        from runtime.core.dicom import check_declared_size

        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, struct.error, zlib.error) as e:
            raise UserError(f"{name}: not a readable DICOM file: {e}") from None
        if not any(k in ds for k in _PIXEL_KEYWORDS):
            sop = ds.get("SOPClassUID")
            what = f"a '{sop.name}' object" if sop else "this file"
            raise UserError(f"{name}: DICOM file has no pixel data: {what} holds no image (or the file is truncated)")
        if not any(ds.get(k) for k in _PIXEL_KEYWORDS):
            raise UserError(f"{name}: the DICOM pixel data element is empty: the file holds no image")
        try:
            n_frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            raise UserError(f"{name}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None
        check_declared_size(ds, name, n_frames)  # a decoding bomb, refused before any pixel is decoded

        meta = ds.file_meta
        if "TransferSyntaxUID" not in meta and ds.original_encoding[0] is not None:
            # A bare dataset without file meta (read via the .dcm suffix) is native; say which native encoding.
            implicit, little = ds.original_encoding
            meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                      pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        ts = meta.get("TransferSyntaxUID")
        if ts is None:
            raise UserError(f"{name}: DICOM file meta has no Transfer Syntax UID, so its pixel encoding is unknown")
        syntax = f"transfer syntax '{ts.name}' ({ts})"
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise UserError(f"{name}: pydicom cannot decode {syntax}; convert the file to an uncompressed "
                            "transfer syntax first (e.g. `gdcmconv --raw`)") from None
        if not decoder.is_available:
            raise UserError(f"{name}: no installed decoder handles {syntax}; {_install_hint(decoder)}")
        return cls(ds, name, n_frames, syntax, decoder)

    def frame(self, index: int | None = None) -> Frame:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

        ds, name = self.ds, self.name
        index = _frame_index(name, index, self.n_frames)
        try:  # pydicom converts YBR_FULL/YBR_FULL_422 (and the JPEG 2000 colour transforms) to RGB here
            arr = pixel_array(ds, index=index if self.n_frames > 1 else None)
        except RuntimeError as e:  # every installed plugin failed on this data (e.g. Pillow on 12-bit JPEG)
            detail = " ".join(str(e).split())
            raise UserError(f"{name}: cannot decode {self._syntax}: {detail}; {_install_hint(self._decoder)}") from None
        except (ValueError, AttributeError, NotImplementedError, KeyError) as e:  # truncated or inconsistent
            raise UserError(f"{name}: corrupt or truncated DICOM pixel data: {' '.join(str(e).split())}") from None

        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        if photometric == "PALETTE COLOR":
            try:
                rgb = _to_uint8(apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
            except (ValueError, AttributeError, IndexError) as e:  # the palette lookup table is missing or broken
                raise UserError(f"{name}: PALETTE COLOR image without a usable colour lookup table: {e}") from None
        elif arr.ndim == 3:  # colour: no VOI windowing in DICOM, just scale the stored bit depth to 8 bits
            rgb = _to_uint8(arr, int(ds.get("BitsStored") or arr.dtype.itemsize * 8))
        else:
            rgb = None
        if rgb is not None:
            return Frame(name, np.ascontiguousarray(rgb), None, photometric)

        rescale = ds if ("RescaleSlope" in ds or "ModalityLUTSequence" in ds) else \
            _functional_group(ds, index, "PixelValueTransformationSequence")
        slope = rescale.get("RescaleSlope") if rescale is not None else None
        if slope is not None and not (np.isfinite(_first(slope)) and _first(slope) != 0):
            raise UserError(f"{name}: invalid RescaleSlope {slope!r}: it must be a finite number other than 0 (with 0 "
                            "every pixel maps to the intercept)")
        values = np.asarray(apply_modality_lut(arr, rescale) if rescale is not None else arr, dtype=np.float64)
        _check_finite(name, values)
        voi = ds if "WindowCenter" in ds else _functional_group(ds, index, "FrameVOILUTSequence")
        window = None  # (center, width)
        if voi is not None and voi.get("WindowCenter") is not None and voi.get("WindowWidth") is not None:
            window = _first(voi.WindowCenter), _first(voi.WindowWidth)
        if window is None or not (window[1] > 0 and np.isfinite(window[1]) and np.isfinite(window[0])):
            window = _full_range(name, values)  # none usable in the file
        return Frame(name, values, window, photometric, photometric == "MONOCHROME1")


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: center - width/2 -> 0, center + width/2 -> 255, clipped, rounded to nearest."""
    scaled = (values - (center - width / 2)) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / (2 ** bits - 1))), 0, 255).astype(np.uint8)
