"""The KV cache: one buffer per layer for keys and values, bound to the decoder in place.

Each buffer holds its rows outermost ([rows, kv_heads, head_dim]), so the first `length` rows are one contiguous
view: each step binds exactly those (one masked row for an empty context) and the decoder reads only the context,
not the buffer's spare rows; it returns only the new rows, which `update` writes at `length`. The buffers start at
one row and grow to the next power of two when new rows do not fit: a handful of copies over a whole conversation
(1 -> 1024 -> 2048 for a 616-token prompt), between which nothing moves.
"""

from __future__ import annotations

import numpy as np

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec
from runtime.core.backend import Backend


def check_room(length: int, capacity: int, detail: str = "") -> None:
    """The one refusal of a context longer than the bundle's KV cache."""
    if length > capacity:
        raise UserError(f"the context would reach {length} tokens; this bundle holds at most {capacity}{detail} "
                        "(shorten the prompt, or re-export with a larger --max-context)")


class KVCache:
    def __init__(self, backend: Backend, spec: GraphSpec):
        self.backend, self.spec = backend, spec
        self.pairs = spec.kv_pairs  # (cache input, new-rows output), declared by the decoder's spec
        self.capacity = spec.dims["cache"].max  # the bundle's max_context
        self.length = 0
        self.buffers = self._allocate(1)

    @property
    def rows(self) -> int:
        return next(iter(self.buffers.values())).shape[0]

    def _allocate(self, rows: int) -> dict:
        # Zeroed by the backend: masked rows must hold finite values (0 * NaN from stale garbage is still NaN).
        return {past: self.backend.buffer(self.spec.shape(past, cache=rows), self.spec.tensor(past).dtype)
                for past, _ in self.pairs}

    def feeds(self) -> dict:
        """past_length and the first max(length, 1) rows of every buffer, bound in place (views, no copy)."""
        bound = max(self.length, 1)
        return {"past_length": np.array([self.length], dtype=np.int64),
                **{past: self.backend.head(buffer, bound) for past, buffer in self.buffers.items()}}

    def check_room(self, new: int) -> None:
        check_room(self.length + new, self.capacity)

    def rows_for(self, length: int) -> int:
        """Buffer rows for a context of `length`: the next power of two, at least 1, at most capacity."""
        return min(self.capacity, 1 << (max(length, 1) - 1).bit_length())

    def reserve(self, rows: int) -> None:
        """Make the buffers hold at least `rows` rows (rows_for(rows) of them), the rows written so far kept."""
        if rows > self.rows:
            grown = self._allocate(self.rows_for(rows))
            for past, buffer in grown.items():
                self.backend.write(buffer, self.buffers[past], 0)  # old rows, stale tail included (masked anyway)
            self.buffers = grown

    def update(self, outputs: dict) -> None:
        """Write the step's new rows at [length, length + seq) of every buffer (grown first if they do not fit)."""
        seq = outputs[self.pairs[0][1]].shape[0]
        self.reserve(self.length + seq)
        for past, present in self.pairs:
            self.backend.write(self.buffers[past], outputs[present], self.length)
        self.length += seq

    def truncate(self, length: int) -> None:
        """Keep the first `length` rows (a conversation's reused prefix); the rows after it are masked from now on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length = length

    def row_bytes(self, length: int) -> int:
        """What `copy_rows(length)` would hold, without copying."""
        return sum(length * int(np.prod(b.shape[1:])) * np.dtype(b.dtype).itemsize for b in self.buffers.values())

    def copy_rows(self, length: int) -> dict[str, np.ndarray]:
        """A host copy of every buffer's first `length` rows (the image prefix kept for later conversations); on a
        GPU backend only those rows cross to the host."""
        if not 0 <= length <= self.length:
            raise ValueError(f"the cache holds {self.length} rows, not {length}")
        return {past: np.array(self.backend.head(buffer, length)) for past, buffer in self.buffers.items()}

    def load_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Start over from rows that `copy_rows` took from a cache of the same decoder."""
        self.reset()
        self.update({present: rows[past] for past, present in self.pairs})

    def reset(self) -> None:
        self.length = 0
        if self.rows > 1:
            self.buffers = self._allocate(1)  # the next prefill attends over one masked row
