"""A DICOM file's declared size, checked before decoding: a few kB of RLE can declare a 12000 x 12000 16-bit image."""

from __future__ import annotations

from runtime.contract.errors import UserError

# A DICOM frame is decoded whole (and kept as float64 modality values), so its declared size is checked before
# decoding, as Pillow's decompression-bomb limit does for PNG: at most MAX_FRAME_VALUES values (rows x columns x
# samples per pixel: 5792 x 5792 grey, 3344 x 3344 RGB; 256 MiB as float64), and MAX_FILE_VALUES over all frames.
MAX_FRAME_VALUES = 1 << 25
MAX_FILE_VALUES = 1 << 31


def check_declared_size(ds, name: str, n_frames: int) -> None:
    """Refuse a decoding bomb by what the file declares (a few kB of RLE can declare 12000 x 12000 16-bit)."""
    try:
        rows, cols, samples = (int(ds.get(k) or 1) for k in ("Rows", "Columns", "SamplesPerPixel"))
    except (TypeError, ValueError):
        raise UserError(f"{name}: invalid Rows, Columns or SamplesPerPixel") from None
    per_frame = rows * cols * samples
    for values, limit, per in ((per_frame, MAX_FRAME_VALUES, "frame"), (per_frame * n_frames, MAX_FILE_VALUES, "file")):
        if values > limit:
            raise UserError(f"{name}: the DICOM file declares {n_frames} frame(s) of {rows} x {cols} x {samples} "
                            f"sample(s), {values} values per {per}, over the limit of {limit}: refused before decoding")
