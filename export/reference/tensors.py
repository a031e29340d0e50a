"""The release files' tensors, read one group at a time instead of as a model: what the streaming export
(export/compile/stream.py) builds each decoder layer from.

Safetensors shards are opened per read and the tensor copied out (a mapping kept open would count every page read
so far in the process's RSS); `.bin` files (H-LoRA, fusion: tens of MB per layer at full size) are memory-mapped
by torch.load. Every key is accounted for: asking for one no file has names the files; `unread()` lists what
nothing asked for, which the caller reports as unexpected, as the reference's strict loading does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from export.reference.checkpoint import load_state_dict
from runtime.contract.errors import UserError


class ReleaseTensors:
    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.bins: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    with safe_open(str(f), framework="pt") as h:
                        keys = list(h.keys())
                except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
                    raise UserError(f"{f} is not a readable safetensors file ({e})") from None
            else:
                self.bins[f] = load_state_dict(f, mmap=True)
                keys = list(self.bins[f])
            for k in keys:
                if k in self.where:
                    raise UserError(f"tensor {k} is in both {self.where[k]} and {f}")
                self.where[k] = f
        self.read: set[str] = set()

    def take(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The named tensors as new `dtype` tensors (a cast or a copy: nothing stays mapped)."""
        missing = [k for k in keys if k not in self.where]
        if missing:
            files = sorted({p.name for p in self.where.values()})
            raise UserError(f"the checkpoint has no {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
                            + f" (looked in {', '.join(files)})")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        for f, names in by_file.items():
            if f in self.bins:
                out.update({k: self.bins[f][k].to(dtype, copy=True) for k in names})
                continue
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k).to(dtype, copy=True) for k in names})
        self.read.update(keys)
        return out

    def unread(self) -> list[str]:
        return sorted(set(self.where) - self.read)
