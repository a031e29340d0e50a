"""The calibration set: real medical images (read with the runtime's own loader and CLIP preprocessing), each paired
with a built-in medical question (com) or instruction (gen). Offline: the default set uses only images that ship
inside installed packages.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.files import file_kind
from runtime.core.bundle import file_digest
from runtime.core.clip_input import preprocess
from runtime.core.image import load_image

# pydicom's own test files (always installed with the runtime): MR in four transfer syntaxes' worth of files,
# ultrasound (RGB, YBR JPEG, palette), CT and NM in JPEG 2000. Held out for the accuracy report: HELD_OUT.
PYDICOM_FILES = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "examples_overlay.dcm",
                 "examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm", "693_J2KI.dcm",
                 "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm")
# Found by the same lookup when the optional `pydicom-data` package is installed (radiography, ultrasound, MR).
PYDICOM_DATA_FILES = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm", "MR2_UNCR.dcm")
# scikit-image ships two fundus images in its wheel; used when it is installed (it is not a dependency).
SKIMAGE_FILES = ("retina.jpg", "microaneurysms.png")
# Never calibrated on: the images the accuracy report and `build.py verify` (CT_small) measure with.
HELD_OUT = ("CT_small.dcm", "examples_jpeg2k.dcm")

COM_PROMPTS = (
    "What does this scan show?",
    "Is there any abnormality in this image? Answer in two sentences.",
    "Which imaging modality was used, and which body part is shown?",
    "Describe the findings as a radiologist would.",
    "Are there signs of a fracture, a mass or a lesion?",
    "What is the most likely diagnosis?",
)
GEN_PROMPTS = (
    "Reconstruct the image.",
    "Generate a higher resolution version of this scan.",
    "Reconstruct this image with reduced noise.",
    "Generate the corresponding image in the other modality.",
)
PROMPTS = {"com": COM_PROMPTS, "gen": GEN_PROMPTS}
MIN_IMAGES = 2  # one image would fit the scales to a single picture


@dataclass(frozen=True)
class Sample:
    path: Path
    pixel_values: np.ndarray  # [1, 3, 336, 336] float32, exactly what the runtime feeds the vision graph
    prompt_index: int  # into PROMPTS[task]: each image gets its own question, whatever the task

    def prompt(self, task: str) -> str:
        return PROMPTS[task][self.prompt_index % len(PROMPTS[task])]


def _testdata(names) -> list[Path]:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the files it would have to download
        found = (get_testdata_file(n, download=False) for n in names)
        return [Path(p) for p in found if p is not None]


def default_images() -> list[Path]:
    images = _testdata(PYDICOM_FILES + PYDICOM_DATA_FILES)
    if (skimage := find_spec("skimage")) is not None:
        assert skimage.origin is not None  # a regular package: its __init__.py
        data = Path(skimage.origin).parent / "data"
        images += [data / n for n in SKIMAGE_FILES if (data / n).is_file()]
    return images


def held_out_images() -> list[Path]:
    return _testdata(HELD_OUT)


def _expand(sources) -> list[Path]:
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"calibration folder {src} holds no files (give PNG/JPEG/TIFF/DICOM images)")
            files += found
        elif src.is_file():
            files.append(src)
        elif src.exists():  # a FIFO would block the reader: named, not mistaken for a missing file
            raise UserError(f"calibration image {src}: is {file_kind(src.stat().st_mode)}, not an image file or folder")
        else:
            raise UserError(f"calibration image {src}: no such file or folder")
    return files


def load_set(sources=None, samples: int | None = None) -> list[Sample]:
    """Every image of `sources` (files and folders; default: default_images()), the first `samples` of them if given.
    A file the runtime cannot read is an error, not skipped: a calibration set should be what the user meant."""
    files = _expand(sources) if sources else default_images()
    if samples is not None:
        if samples < MIN_IMAGES:
            raise UserError(f"--samples {samples}: calibration needs at least {MIN_IMAGES} images")
        files = files[:samples]
    if len(files) < MIN_IMAGES:
        raise UserError(f"calibration needs at least {MIN_IMAGES} images, got {len(files)}"
                        + (f" ({files[0]})" if files else "") + "; add images or folders with --images")
    held = {d for p in held_out_images() for d in _fingerprints(p, preprocess(load_image(p)))}
    out = []
    for i, path in enumerate(files):
        try:
            pixels = preprocess(load_image(path))
        except UserError as e:
            raise UserError(f"calibration image unreadable: {e}") from None
        if _fingerprints(path, pixels) & held:
            raise UserError(f"{path} is (a copy of) an image held out for the accuracy report and `verify`; "
                            "calibrate on other images")
        out.append(Sample(path, pixels, i))
    return out


def _fingerprints(path: Path, pixels: np.ndarray) -> set[str]:
    """By content, not by path: the file's sha256, and that of the pixels the model gets (a copy with other tags)."""
    return {file_digest(path), hashlib.sha256(pixels.tobytes()).hexdigest()}


def describe(samples: list[Sample]) -> list[dict]:
    """The set as recorded in the manifest: each file's name, path and sha256."""
    return [{"file": s.path.name, "path": str(s.path), "sha256": file_digest(s.path)} for s in samples]
