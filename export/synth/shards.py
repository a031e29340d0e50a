"""A streaming safetensors writer: HF checkpoints written tensor by tensor, so a multi-GB model never sits in memory.

The safetensors library serializes a whole dict at once; the format itself is simple enough to stream: an 8-byte
little-endian header length, a JSON header ({name: {dtype, shape, data_offsets}}, `__metadata__` {"format": "pt"},
padded with spaces to 8 bytes as the library pads it), then each tensor's raw little-endian bytes in header order.
Sharded like HF's save_pretrained: `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"

Entry = tuple[str, tuple[int, ...]]  # tensor name, shape
Make = Callable[[str, tuple[int, ...]], torch.Tensor]  # builds one tensor when its turn to be written comes


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def header(entries: Sequence[Entry], dtype: torch.dtype) -> bytes:
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        size = nbytes(shape, dtype)
        meta[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_safetensors(path: Path, entries: Sequence[Entry], make: Make, dtype: torch.dtype) -> None:
    """One file; only one tensor (and its cast) is in memory at a time."""
    with open(path, "wb") as f:
        f.write(header(entries, dtype))
        for name, shape in entries:
            t = make(name, shape).to(dtype).contiguous()
            assert tuple(t.shape) == shape, f"{name}: made {tuple(t.shape)}, declared {shape}"
            f.write(t.view(-1).view(torch.uint8).numpy().data)  # CPU tensors are little-endian here


def split(entries: Sequence[Entry], dtype: torch.dtype, shards: int) -> list[list[Entry]]:
    """Consecutive groups of about equal bytes (HF keeps state-dict order across shards too): each tensor goes to
    the shard its middle byte falls in."""
    total = sum(nbytes(s, dtype) for _, s in entries)
    groups, done = [[] for _ in range(shards)], 0
    for name, shape in entries:
        size = nbytes(shape, dtype)
        groups[(2 * done + size) * shards // (2 * total)].append((name, shape))
        done += size
    if not all(groups):
        raise ValueError(f"{len(entries)} tensors cannot fill {shards} shards")
    return groups


def write_model(out: Path, entries: Sequence[Entry], make: Make, dtype: torch.dtype, shards: int = 1) -> None:
    """HF's weight files in `out`: model.safetensors, or N shards plus the index from_pretrained reads."""
    if shards == 1:
        write_safetensors(out / SINGLE, entries, make, dtype)
        return
    weight_map = {}
    for i, group in enumerate(split(entries, dtype, shards), 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / name, group, make, dtype)
        weight_map.update({key: name for key, _ in group})
    total = sum(nbytes(s, dtype) for _, s in entries)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
