"""Uploaded files, decoded once: the app keeps the last few in memory and renders frames under any window."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from typing import Any

from PIL import Image

from runtime.contract.errors import UserError
from runtime.core.image import DicomFile, Frame, open_image

KEEP_SCANS = 8  # files held for re-windowing; an older one must be opened again
KEEP_FRAMES = 16  # decoded frames per file (a multi-frame slider revisits frames)

# CT presets (center, width) in Hounsfield units.
CT_PRESETS = {"brain": (40.0, 80.0), "soft tissue": (50.0, 350.0), "lung": (-600.0, 1500.0), "bone": (500.0, 2000.0)}


def _date(value) -> str | None:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else (text or None)


class Scan:
    def __init__(self, data: bytes, name: str):
        self.id, self.name = uuid.uuid4().hex, name
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.file = open_image(data, name)
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        self._lock = threading.Lock()
        self.frame(0)  # decode now, so a broken file is refused at upload, not at the first question

    def frame(self, index: int) -> Frame:
        with self._lock:
            if index not in self._frames:
                self._frames[index] = self.file.frame(index)
                if len(self._frames) > KEEP_FRAMES:
                    self._frames.popitem(last=False)
            self._frames.move_to_end(index)
            return self._frames[index]

    def render(self, index: int, window: tuple[float, float] | None) -> tuple[Image.Image, tuple[float, float] | None]:
        """The image as shown and as the model gets it, and the window in effect (None: colour, no window)."""
        frame = self.frame(index)
        return frame.render(window), (window if window is not None else frame.window)

    def describe(self) -> dict:
        height, width = self.frame(0).pixels.shape[:2]
        out: dict[str, Any] = {"id": self.id, "name": self.name, "sha256": self.sha256, "frames": self.file.n_frames,
                               "size": f"{width} x {height}", "dicom": isinstance(self.file, DicomFile),
                               "monochrome": self.frame(0).window is not None, "presets": {}, "tags": {}}
        if isinstance(self.file, DicomFile):
            ds = self.file.ds
            modality = str(ds.get("Modality") or "") or None
            units = str(ds.get("RescaleType") or "") or ("HU" if modality == "CT" else "")
            out["units"] = units
            if out["monochrome"] and units == "HU":
                out["presets"] = CT_PRESETS
            out["tags"] = {"modality": modality, "body_part": str(ds.get("BodyPartExamined") or "") or None,
                           "study_date": _date(ds.get("StudyDate")),
                           "patient_name": str(ds.get("PatientName") or "") or None,
                           "description": str(ds.get("SeriesDescription") or ds.get("StudyDescription") or "") or None}
        return out


class Scans:
    """The last KEEP_SCANS uploads by id."""

    def __init__(self):
        self._scans: OrderedDict[str, Scan] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, scan: Scan) -> None:
        with self._lock:
            self._scans[scan.id] = scan
            if len(self._scans) > KEEP_SCANS:
                self._scans.popitem(last=False)

    def get(self, scan_id: str) -> Scan:
        with self._lock:
            scan = self._scans.get(scan_id)
        if scan is None:
            raise UserError("that image is no longer held by the app (it keeps the last "
                            f"{KEEP_SCANS} files): open the file again")
        return scan
