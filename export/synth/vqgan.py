"""A random GumbelVQ checkpoint in taming's release layout (last.ckpt + model.yaml), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from export.reference.vqgan import GumbelVQDecoder, VQGANConfig


def random_vqgan(config: VQGANConfig, seed: int = 0) -> GumbelVQDecoder:
    """A randomly initialised decoder whose image is neither flat nor saturated, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GumbelVQDecoder(config)
        for m in model.modules():  # give the norms non-trivial affines so a mis-loaded one changes the image
            if isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.1)
                nn.init.normal_(m.bias, 0.0, 0.1)
    return model.eval().requires_grad_(False)


def write_synthetic_vqgan(out_dir: Path, seed: int = 0, config: VQGANConfig | None = None) -> None:
    """`last.ckpt` (Lightning layout) and `model.yaml` (taming layout) of a random GumbelVQ; default: tiny config."""
    config = config or VQGANConfig.tiny()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = dict(random_vqgan(config, seed).state_dict())
    # a few of the real file's non-decoder tensors (taming names and shapes) so loaders meet them
    z2, top = config.z_channels * (2 if config.double_z else 1), config.ch * config.ch_mult[-1]
    g = torch.Generator().manual_seed(seed + 1)
    for name, shape in {"encoder.conv_in.weight": (config.ch, config.in_channels, 3, 3),
                        "encoder.conv_out.weight": (z2, top, 3, 3), "encoder.conv_out.bias": (z2,),
                        "quant_conv.weight": (config.embed_dim, config.z_channels, 1, 1),
                        "quant_conv.bias": (config.embed_dim,),
                        "quantize.proj.weight": (config.n_embed, config.z_channels, 1, 1),
                        "quantize.proj.bias": (config.n_embed,)}.items():
        sd[name] = torch.randn(shape, generator=g) * 0.02
    torch.save({"state_dict": sd, "global_step": 0}, out_dir / "last.ckpt")
    (out_dir / "model.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
