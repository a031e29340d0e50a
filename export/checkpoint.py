"""The release files on local disk: where they are, and loading them with strict key accounting.

Checkpoint directory layout (what a user downloads, side by side; `build.py synth` writes the same):
    DIR/Phi-3-mini-4k-instruct/ or DIR/phi-4/      base LLM, HF layout (config, generation_config, weights, tokenizer)
    DIR/clip-vit-large-patch14-336/                CLIP, HF layout
    DIR/HealthGPT-M3/ or DIR/HealthGPT-L14/        H-LoRA .bin per task (+ fusion_layer_weights.bin for M3)
    DIR/taming_transformers/ckpt/                  VQGAN last.ckpt + model.yaml
"""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from export.variants import CLIP_DIR, VARIANTS, VQGAN_DIR, Variant, get_task
from runtime.errors import UserError

PEFT_PREFIX = "base_model.model."  # HealthGPT loads its .bin files into the PeftModel wrapper


@dataclass(frozen=True)
class CheckpointPaths:
    root: Path
    variant: Variant

    @classmethod
    def find(cls, root: str | Path) -> CheckpointPaths:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"checkpoint directory {root} does not exist")
        found = [v for v in VARIANTS.values() if (root / v.release_dir).is_dir()]
        if len(found) != 1:
            names = " or ".join(v.release_dir for v in VARIANTS.values())
            raise UserError(f"{root} must hold exactly one of {names} (found {len(found)}); see the layout in README")
        paths = cls(root, found[0])
        for p in (paths.base, paths.clip):
            if not (p / "config.json").is_file():
                raise UserError(f"{p} is missing or has no config.json (expected a HF model directory)")
        return paths

    @property
    def base(self) -> Path:
        return self.root / self.variant.base_dir

    @property
    def clip(self) -> Path:
        return self.root / CLIP_DIR

    @property
    def vqgan_ckpt(self) -> Path:
        return self.root / VQGAN_DIR / "last.ckpt"

    @property
    def vqgan_yaml(self) -> Path:
        return self.root / VQGAN_DIR / "model.yaml"

    def release_file(self, name: str) -> Path:
        return self.root / self.variant.release_dir / name

    def hlora(self, task: str) -> Path:
        return self.release_file(get_task(self.variant, task).hlora_file)

    def fusion(self, task: str) -> Path | None:
        name = get_task(self.variant, task).fusion_file
        return self.release_file(name) if name else None

    def eos_ids(self) -> list[int]:
        """Stop ids from the base model's generation_config.json (Phi-3 revisions differ: read, don't assume)."""
        cfg = json.loads((self.base / "generation_config.json").read_text())
        eos = cfg.get("eos_token_id")
        return [eos] if isinstance(eos, int) else list(eos)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; a file carrying pickled objects is refused with what to do about it."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{path} cannot be loaded safely with weights_only=True ({str(e).splitlines()[0]}); "
                        f"re-save only its tensors in a trusted environment") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def assign_weights(targets: dict[str, torch.nn.Parameter], sd: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every target key from `sd`. Missing keys and shape mismatches are errors naming the file; unexpected keys
    are listed. `copy_` casts (bf16 -> model dtype) exactly as the reference's load_state_dict does."""
    missing = [k for k in targets if k not in sd]
    if missing:
        shown = ", ".join(missing[:10])
        raise UserError(f"{path} is missing {len(missing)} key(s): {shown}{' ...' if len(missing) > 10 else ''}")
    unexpected = sorted(k for k in sd if k not in targets)
    if unexpected:
        print(f"[W] {path.name}: {len(unexpected)} unexpected key(s) ignored: {', '.join(unexpected[:10])}",
              file=sys.stderr)
    with torch.no_grad():
        for k, dst in targets.items():
            if sd[k].shape != dst.shape:
                raise UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(dst.shape)}")
            dst.copy_(sd[k])
