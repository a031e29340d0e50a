"""What a DICOM file declares, read before or around decoding: its size (a decoding bomb is refused before any pixel
is decoded), its per-frame rescale and window groups, and the pip packages a missing decoder needs."""

from __future__ import annotations

import re
from collections.abc import Sequence

from runtime.contract.errors import UserError

# A DICOM frame is decoded whole (and kept as float64 modality values), so its declared size is checked before
# decoding, as Pillow's decompression-bomb limit does for PNG: at most MAX_FRAME_VALUES values (rows x columns x
# samples per pixel: 5792 x 5792 grey, 3344 x 3344 RGB; 256 MiB as float64), and MAX_FILE_VALUES over all frames.
MAX_FRAME_VALUES = 1 << 25
MAX_FILE_VALUES = 1 << 31
# pip names for the dependencies pydicom reports as missing, where they differ from the import name.
PIP_NAMES = {"gdcm": "python-gdcm"}


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


def install_hint(decoder) -> str:
    """Turn pydicom's 'gdcm - requires gdcm>=3.0.10' lines into pip commands."""
    cmds = []
    for line in decoder.missing_dependencies:
        needs = line.split("requires", 1)[-1].split(" and ")
        names = [re.match(r"\s*([A-Za-z0-9_.\-]+)", n).group(1) for n in needs if n.strip()]
        names = [PIP_NAMES.get(n, n) for n in names if n != "numpy"]
        if names:
            cmds.append("`pip install " + " ".join(names) + "`")
    return ("to decode it, install one of: " + " or ".join(cmds)) if cmds else \
        "convert it to an uncompressed transfer syntax first (e.g. `gdcmconv --raw` or `dcmdjpeg`)"


def first(value) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def functional_group(ds, index: int, sequence: str):
    """Enhanced multi-frame files keep rescale and window per frame (or shared) in functional groups."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and i < len(items) and items[i].get(sequence):
            return items[i].get(sequence)[0]
    return None
