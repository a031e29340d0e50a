"""The image prefix cache: the KV rows of a prompt up to the end of its image rows, kept for the next conversation
on the same image, so that it starts without the vision graph and without prefilling those rows again.

Keyed by what decides those rows: the bundle (its manifest digest: graphs, weights, template, tokenizer), the task
(its own H-LoRA experts) and the image the model sees (the decoded frame under its window, hashed: two files, frames
or windows share an entry only when they give the same pixels). Bounded in bytes, least recently used out;
thread-safe (one lock around a dict; the rows are never written once stored).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image


def image_digest(image: Image.Image) -> str:
    """What the model sees of an image: mode, size and pixels."""
    h = hashlib.sha256(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Prefix:
    ids: tuple[int, ...]  # the prompt ids the rows hold, each image row as IMAGE_TOKEN_INDEX
    rows: dict[str, np.ndarray]  # cache input name -> [1, heads, len(ids), head_dim]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows.values())


class PrefixCache:
    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[tuple[str, str, str], Prefix] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: tuple[str, str, str]) -> Prefix | None:
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is not None:
                self._entries.move_to_end(key)
            return prefix

    def keeps(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` would be kept (so that one is not copied out of a cache for nothing)."""
        return nbytes <= self.max_bytes

    def put(self, key: tuple[str, str, str], prefix: Prefix) -> None:
        """Keep `prefix`, dropping the least recently used entries until all fit (one larger than the bound is
        not kept)."""
        if not self.keeps(prefix.nbytes):
            return
        with self._lock:
            self._entries[key] = prefix
            self._entries.move_to_end(key)
            total = sum(p.nbytes for p in self._entries.values())
            while total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes
