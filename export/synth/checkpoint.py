"""Random checkpoints in exactly the release layout (see export/checkpoint.py), so tests load them through the
same code as the real files. `tiny` keeps the geometry that matters (336 px / patch 14 -> 576 tokens, 8192 VQ codes,
32x32 latent -> 256x256, real vocabularies and token ids, real H-LoRA ranks); `real` has M3's / L14's true widths
with few decoder layers, for benchmarks; `full` is HealthGPT-M3 whole, its base in two bf16 shards as released.
The base LLM is written tensor by tensor (export/synth/shards.py) at every size, so no size holds it in memory."""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM

from export.outdir import SYNTHETIC_MARKER, staged
from export.reference.checkpoint import PEFT_PREFIX, CheckpointPaths
from export.reference.hlora import ADAPTED
from export.reference.variants import CLIP_DIR, VQGAN_DIR, get_variant
from export.reference.vqgan import VQGANConfig
from export.synth.shards import write_model
from export.synth.tokenizer import write_phi3_tokenizer, write_phi4_tokenizer
from export.synth.vqgan import write_synthetic_vqgan
from runtime.contract.errors import UserError
from runtime.contract.healthgpt import HEALTHGPT_TOKENS


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    clip_width: int = 64
    clip_layers: int = 4
    clip_heads: int = 4
    full_vqgan: bool = False
    dtype: torch.dtype = torch.float32  # of the base LLM's weight files
    shards: int = 1


SIZES = {
    ("m3", "tiny"): Size(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128),
    ("l14", "tiny"): Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160),
    ("m3", "real"): Size(hidden=3072, layers=2, heads=32, kv_heads=32, intermediate=8192,
                         clip_width=1024, clip_layers=24, clip_heads=16, full_vqgan=True),
    ("l14", "real"): Size(hidden=5120, layers=2, heads=40, kv_heads=10, intermediate=17920,
                          clip_width=1024, clip_layers=24, clip_heads=16, full_vqgan=True),
    ("m3", "full"): Size(hidden=3072, layers=32, heads=32, kv_heads=32, intermediate=8192,
                         clip_width=1024, clip_layers=24, clip_heads=16, full_vqgan=True,
                         dtype=torch.bfloat16, shards=2),
}

# Facts of the real base models (healthgpt.md §1.2) that the synthetic ones keep.
BASES = {
    "m3": dict(vocab_size=32064, rope_theta=10000.0, max_position_embeddings=4096, sliding_window=2047,
               bos_token_id=1, eos_token_id=32000, pad_token_id=32000, eos=[32000, 32001, 32007],
               tokenizer=write_phi3_tokenizer),
    "l14": dict(vocab_size=100352, rope_theta=250000.0, max_position_embeddings=16384, sliding_window=None,
                bos_token_id=100257, eos_token_id=100265, pad_token_id=100349, eos=[100265],
                tokenizer=write_phi4_tokenizer),
}


def base_config(variant: str, size: Size) -> Phi3Config:
    base = {k: v for k, v in BASES[variant].items() if k not in ("eos", "tokenizer")}
    return Phi3Config(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate, rms_norm_eps=1e-5,
                      original_max_position_embeddings=base["max_position_embeddings"], tie_word_embeddings=False,
                      architectures=["Phi3ForCausalLM"], **base)


def write_base(out: Path, variant: str, size: Size, seed: int) -> Phi3Config:
    config, base = base_config(variant, size), BASES[variant]
    out.mkdir(parents=True)
    fields = config.to_dict()
    fields.pop("dtype", None)
    fields["torch_dtype"] = str(size.dtype).removeprefix("torch.")  # the key the released config.json uses
    (out / "config.json").write_text(json.dumps(fields, indent=2))
    write_model(out, *base_weights(config, seed), size.dtype, size.shards)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": base["bos_token_id"], "eos_token_id": base["eos"], "pad_token_id": base["pad_token_id"]},
        indent=2))
    base["tokenizer"](out)
    return config


def base_weights(config: Phi3Config, seed: int):
    """Phi3ForCausalLM's state-dict names and shapes (from a meta-device model: no memory) and a maker that draws
    each tensor as HF's init does (normal(0, initializer_range) for linears and embeddings, the padding row zero,
    ones for RMSNorm) from a generator seeded by the seed and the tensor's name: a tensor's values do not depend on
    the file layout or dtype it is written with, nor on the layer count."""
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    entries = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        module = model.get_submodule(name.rpartition(".")[0])
        if type(module).__name__.endswith("RMSNorm"):
            return torch.ones(shape)
        if not isinstance(module, (nn.Linear, nn.Embedding)) or not name.endswith(".weight"):
            raise AssertionError(f"no init rule for {name} ({type(module).__name__})")
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        w = torch.empty(shape).normal_(0.0, config.initializer_range, generator=gen)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            w[module.padding_idx] = 0
        return w

    return entries, make


def write_clip(out: Path, size: Size) -> None:
    """A full CLIPModel like openai's folder (a tiny text tower beside the vision tower), plus its preprocessor."""
    vision = dict(hidden_size=size.clip_width, intermediate_size=4 * size.clip_width, projection_dim=size.clip_width,
                  num_hidden_layers=size.clip_layers, num_attention_heads=size.clip_heads, image_size=336,
                  patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=size.clip_width, vocab_size=1000)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.clip_width)).save_pretrained(
        out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 336}, indent=2))


def hlora_state_dict(config: Phi3Config, clip_width: int, rank: int, gen: torch.Generator) -> OrderedDict:
    """PeftModel key names, bf16 as released; A/R scaled like trained adapters so the LoRA term is visible."""
    h, inter = config.hidden_size, config.intermediate_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * (h // config.num_attention_heads)
    shapes = {"self_attn.qkv_proj": (h, qkv), "self_attn.o_proj": (h, h),
              "mlp.gate_up_proj": (h, 2 * inter), "mlp.down_proj": (inter, h)}

    def rand(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    sd = OrderedDict()
    for i in range(config.num_hidden_layers):
        for path in ADAPTED:
            fan_in, fan_out = shapes[path]
            key = f"{PEFT_PREFIX}model.layers.{i}.{path}"
            sd[f"{key}.lora_A.weight"] = rand(rank, fan_in, std=fan_in ** -0.5)
            sd[f"{key}.lora_B.weight"] = rand(fan_out, rank, std=0.02 / rank ** 0.5)
            sd[f"{key}.lora_route.weight"] = rand(4, fan_in, std=fan_in ** -0.5)
    for k, shape in {"0.weight": (h, clip_width), "0.bias": (h,), "2.weight": (h, h), "2.bias": (h,)}.items():
        sd[f"{PEFT_PREFIX}model.mm_projector.{k}"] = rand(*shape, std=shape[-1] ** -0.5)
    return sd


def synthesize(out: str | Path, variant: str = "m3", size: str | Size = "tiny", seed: int = 0,
               layers: int | None = None, dtype: torch.dtype | None = None,
               shards: int | None = None) -> CheckpointPaths:
    """Write a complete random checkpoint to `out` (swapped in whole when done; see export/outdir.py).
    layers: decoder layers instead of the size's own (benchmarks at real widths with N layers); dtype, shards: the
    base LLM's weight files instead of the size's own (CI covers the released bf16 shards at tiny size)."""
    v = get_variant(variant)
    overrides = {k: val for k, val in dict(layers=layers, dtype=dtype, shards=shards).items() if val is not None}
    for name in ("layers", "shards"):
        if overrides.get(name, 1) < 1:
            raise UserError(f"{name} must be at least 1, got {overrides[name]}")
    s = dataclasses.replace(_size(variant, size), **overrides)
    with staged(out, "checkpoint", []) as tmp:
        _write(tmp, v, variant, s, seed)
        (tmp / SYNTHETIC_MARKER).write_text(f"{variant} {size} seed {seed}\n")
    return CheckpointPaths.find(out)


def _size(variant: str, size: str | Size) -> Size:
    if isinstance(size, Size):  # a geometry of the caller's (tests probing how memory scales)
        return size
    if (variant, size) in SIZES:
        return SIZES[variant, size]
    names = sorted({s for _, s in SIZES})
    if size not in names:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(names)}")
    has = ", ".join(s for v, s in SIZES if v == variant)
    raise UserError(f"size {size!r} is written for {', '.join(v for v, s in SIZES if s == size)} only; "
                    f"{variant} has {has}")


def _write(tmp: Path, v, variant: str, s: Size, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = write_base(tmp / v.base_dir, variant, s, seed)
    write_clip(tmp / CLIP_DIR, s)
    (tmp / v.release_dir).mkdir(parents=True)
    vocab = len(HEALTHGPT_TOKENS) + (32011 if variant == "m3" else 100352)
    for _task, cfg in v.tasks.items():
        torch.save(hlora_state_dict(config, s.clip_width, cfg.rank, gen), tmp / v.release_dir / cfg.hlora_file)
        if cfg.fusion_file:
            fusion = OrderedDict((f"{PEFT_PREFIX}{k}", torch.randn(vocab, s.hidden, generator=gen).mul_(0.02).to(
                torch.bfloat16)) for k in ("model.embed_tokens.weight", "lm_head.weight"))  # one fp32 copy at a time
            torch.save(fusion, tmp / v.release_dir / cfg.fusion_file)
    write_synthetic_vqgan(tmp / VQGAN_DIR, seed=seed, config=VQGANConfig.full() if s.full_vqgan else None)
