"""The release files on local disk: where they are, and loading them with strict key accounting.

Checkpoint directory layout (what a user downloads, side by side; `build.py synth` writes the same):
    DIR/Phi-3-mini-4k-instruct/ or DIR/phi-4/      base LLM, HF layout (config, generation_config, weights, tokenizer)
    DIR/clip-vit-large-patch14-336/                CLIP, HF layout
    DIR/HealthGPT-M3/ or DIR/HealthGPT-L14/        H-LoRA .bin per task (+ fusion_layer_weights.bin for M3)
    DIR/taming_transformers/ckpt/                  VQGAN last.ckpt + model.yaml
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from export.reference.variants import CLIP_DIR, VARIANTS, VQGAN_DIR, Variant, get_task
from runtime.contract.errors import UserError

PEFT_PREFIX = "base_model.model."  # HealthGPT loads its .bin files into the PeftModel wrapper
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"  # HF's names, in its order


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
        check_config(read_json(paths.base / "config.json"), paths.base / "config.json")
        check_config(read_json(paths.clip / "config.json").get("vision_config", {}), paths.clip / "config.json")
        check_weight_files(paths.base, "the base LLM")
        check_weight_files(paths.clip, "CLIP")
        paths.eos_ids()  # generation_config.json: present, and its stop ids are ids
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
        path = self.base / "generation_config.json"
        eos = read_json(path).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos
        if not isinstance(eos, list) or not eos or not all(isinstance(i, int) and i >= 0 for i in eos):
            raise UserError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        return eos


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing (part of the release layout; see README)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def weight_files(model_dir: Path, what: str) -> list[Path]:
    """The weight files from_pretrained reads, in its order: model.safetensors, else the shards the index names,
    else every *.safetensors (none: an empty list)."""
    if (model_dir / SAFETENSORS).is_file() or not (model_dir / SAFETENSORS_INDEX).is_file():
        return sorted(model_dir.glob("*.safetensors"))
    index = model_dir / SAFETENSORS_INDEX
    weight_map = read_json(index).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(
            isinstance(s, str) and Path(s).name == s for s in weight_map.values())):
        raise UserError(f"cannot load {what}: {index} has no weight_map of tensor names to shard files beside it")
    return [model_dir / s for s in sorted(set(weight_map.values()))]


def check_weight_files(model_dir: Path, what: str) -> None:
    """The safetensors files from_pretrained will read, checked from their headers only (cheap at any size): each
    file as long as its header says, and with a sharded checkpoint's index every tensor in the shard it names."""
    files = weight_files(model_dir, what)
    index = model_dir / SAFETENSORS_INDEX
    if (model_dir / SAFETENSORS).is_file() or not index.is_file():
        for path in files:
            safetensors_header(path, what)
        return
    weight_map = read_json(index)["weight_map"]
    for path in files:
        keys = [k for k, s in weight_map.items() if s == path.name]
        if not path.is_file():
            raise UserError(f"cannot load {what}: {index} places {keys[0]} in {path.name}, which does not exist")
        held = safetensors_header(path, what)
        if absent := [k for k in keys if k not in held]:
            raise UserError(f"cannot load {what}: {path} does not hold {absent[0]}"
                            + (f" (nor {len(absent) - 1} more)" if len(absent) > 1 else "")
                            + f", which {index.name} places there")


def safetensors_header(path: Path, what: str) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then the JSON), read without its data."""
    try:
        with open(path, "rb") as f:
            size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"cannot load {what}: {path} is not a safetensors file ({type(e).__name__}: {e})") from None
    if 8 + n + end != size:
        raise UserError(f"cannot load {what}: {path} is {size} bytes but its header accounts for {8 + n + end} "
                        "(truncated download?)")
    return header


POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "num_key_value_heads", "image_size", "patch_size")


def check_config(cfg: dict, path: Path) -> None:
    """The geometry fields HF would build tensors from: positive integers that divide as attention needs."""
    for key in POSITIVE:
        if key in cfg and not (isinstance(cfg[key], int) and not isinstance(cfg[key], bool) and cfg[key] >= 1):
            raise UserError(f"{path}: {key} must be a positive integer, got {cfg[key]!r}")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads and cfg.get("hidden_size") and cfg["hidden_size"] % heads:
        raise UserError(f"{path}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads {heads}")
    if heads and kv and heads % kv:
        raise UserError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")


def check_loading(info: dict, path: Path, what: str, unused: tuple[str, ...] = ()) -> None:
    """from_pretrained's loading info: every weight the model needs was in the files, and every tensor in the files
    was used (a config that does not match its weights drops tensors silently otherwise); `unused`: prefixes of
    tensors the release files carry for parts we do not build (CLIP's text tower)."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind, ())
                      if kind != "unexpected_keys" or not str(k).startswith(unused))
        if keys:
            shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            raise UserError(f"{what} at {path}: {len(keys)} {kind.replace('_', ' ')} ({shown}): its config.json "
                            "does not match its weights")


def load_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (mmap: tensors read from the file when used); a file carrying pickled
    objects is refused with what to do about it."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, IndexError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file's error has no message
        raise UserError(f"{path} cannot be loaded safely with weights_only=True ({first}); it is truncated, not a "
                        "PyTorch file, or holds pickled objects: re-save only its tensors in a trusted environment"
                        ) from None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def assign_weights(targets: dict[str, torch.nn.Parameter], sd: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every target key from `sd`. Missing keys, unexpected keys (a weight nothing would use: the file does not
    match the model it is loaded into) and shape mismatches are errors naming the file and the keys. `copy_` casts
    (bf16 -> model dtype) exactly as the reference's load_state_dict does."""
    for what, keys in (("is missing", [k for k in targets if k not in sd]),
                       ("has unexpected", sorted(k for k in sd if k not in targets))):
        if keys:
            shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
            raise UserError(f"{path} {what} {len(keys)} key(s): {shown}")
    with torch.no_grad():
        for k, dst in targets.items():
            if sd[k].shape != dst.shape:
                raise UserError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(dst.shape)}")
            dst.copy_(sd[k])
