"""The KV cache: one preallocated buffer per layer for keys and values, bound to the decoder in place.

Each step the decoder reads the whole buffer (rows >= length are masked inside the graph) and returns only the
new rows; `update` writes them at `length`. Nothing is reallocated or copied as the context grows.
"""

from __future__ import annotations

import numpy as np

from runtime.backend import Backend
from runtime.errors import UserError
from runtime.graphspec import GraphSpec

PAST, PRESENT = "past_key_values.", "present."


class KVCache:
    def __init__(self, backend: Backend, spec: GraphSpec):
        self.backend = backend
        pasts = [t for t in spec.inputs if t.name.startswith(PAST)]
        self.pairs = [(t.name, PRESENT + t.name[len(PAST):]) for t in pasts]  # (cache input, new-rows output)
        self.buffers = {t.name: backend.buffer(spec.shape(t.name), t.dtype) for t in pasts}
        self.capacity = spec.shape(pasts[0].name)[2]  # [1, kv_heads, max_context, head_dim]
        self.length = 0

    def feeds(self) -> dict:
        return {"past_length": np.array([self.length], dtype=np.int64), **self.buffers}

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise UserError(f"the context would reach {self.length + new} tokens; this bundle holds at most "
                            f"{self.capacity} (re-export with a larger --max-context)")

    def update(self, outputs: dict) -> None:
        """Write the step's new rows at [length, length + seq) of every buffer, then advance."""
        seq = outputs[self.pairs[0][1]].shape[2]
        for past, present in self.pairs:
            self.backend.write(self.buffers[past], outputs[present], self.length)
        self.length += seq

    def reset(self) -> None:
        self.length = 0  # stale rows stay: the graph masks everything at or past `length`
