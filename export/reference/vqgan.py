"""HealthGPT's image decoder: taming-transformers GumbelVQ (f8, 8192 codes), indices -> 256x256 RGB (reference §3.1).

Our own copy of taming's Decoder. Module and parameter names are taming's, so the release `last.ckpt` loads key for
key. `forward` has static shapes and no data-dependent branches so it exports to ONNX, and it ends in the same uint8
image as HealthGPT's `custom_to_pil`.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from runtime.contract.errors import UserError

log = logging.getLogger(__name__)

GUMBEL_TARGET = "taming.models.vqgan.GumbelVQ"
_DECODER_PREFIXES = ("quantize.embed.", "post_quant_conv.", "decoder.")  # everything else in last.ckpt is unused
_DDCONFIG = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
             "attn_resolutions", "dropout")


@dataclass(frozen=True)
class VQGANConfig:
    embed_dim: int
    n_embed: int
    z_channels: int
    resolution: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    dropout: float = 0.0

    @classmethod
    def full(cls) -> VQGANConfig:
        """The released `taming_transformers/ckpt/model.yaml`."""
        return cls(embed_dim=256, n_embed=8192, z_channels=256, resolution=256, ch=128, ch_mult=(1, 1, 2, 4),
                   num_res_blocks=2, attn_resolutions=(32,))

    @classmethod
    def tiny(cls) -> VQGANConfig:
        """The real geometry (8192 codes, 32x32 latent -> 256x256, attention at 32) with narrow layers, for tests."""
        return cls(embed_dim=32, n_embed=8192, z_channels=32, resolution=256, ch=32, ch_mult=(1, 1, 2, 4),
                   num_res_blocks=1, attn_resolutions=(32,))

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return self.latent_side**2

    @classmethod
    def from_yaml(cls, path: str | Path) -> VQGANConfig:
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read the VQGAN config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e

        def get(*keys):
            node = doc
            for i, key in enumerate(keys):
                if not isinstance(node, dict) or key not in node:
                    raise UserError(f"{path} is not a taming model.yaml: it has no {'.'.join(keys[: i + 1])}")
                node = node[key]
            return node

        target = get("model", "target")
        if target != GUMBEL_TARGET:
            raise UserError(f"{path} describes {target}; HealthGPT's decoder is {GUMBEL_TARGET}")
        params, dd = ("model", "params"), ("model", "params", "ddconfig")
        if get(*dd).get("give_pre_end") or get(*dd).get("tanh_out"):
            raise UserError(f"{path}: give_pre_end / tanh_out are not supported (HealthGPT's config has neither)")
        raw = {k: get(*params, k) for k in ("embed_dim", "n_embed")} | {k: get(*dd, k) for k in _DDCONFIG}
        cast = {"ch_mult": lambda v: tuple(map(int, v)), "attn_resolutions": lambda v: tuple(map(int, v)),
                "double_z": bool, "dropout": float}
        try:
            return cls(**{k: cast.get(k, int)(v) for k, v in raw.items()})
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} has a malformed value in model.params: {e}") from e

    def to_yaml_dict(self) -> dict:
        """taming's model.yaml layout; the scheduler and loss entries matter only for training."""
        dd = {k: getattr(self, k) for k in _DDCONFIG} | {"ch_mult": list(self.ch_mult),
                                                         "attn_resolutions": list(self.attn_resolutions)}
        scheduler = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                     "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9,
                                "lr_min": 1.0e-06}}
        return {"model": {"base_learning_rate": 4.5e-06, "target": GUMBEL_TARGET, "params": {
            "kl_weight": 1.0e-08, "embed_dim": self.embed_dim, "n_embed": self.n_embed, "monitor": "val/rec_loss",
            "temperature_scheduler_config": scheduler, "ddconfig": dd,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # taming's form, not F.silu, to stay bit-close to the reference


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # dropout is 0.0 and we only run eval
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, computed in taming's order (bmm, scale, softmax)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.scale = _norm(channels), int(channels) ** -0.5  # a Python float: no shape ops in the graph
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        q = self.q(h_).reshape(b, c, h * w).permute(0, 2, 1)
        k, v = self.k(h_).reshape(b, c, h * w), self.v(h_).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * self.scale, dim=2)
        return x + self.proj_out(torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming's Decoder with temb_channels=0, give_pre_end=False, tanh_out=False. up[0] is the full resolution."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in, res = cfg.ch * cfg.ch_mult[-1], cfg.latent_side
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(block_in, block_in), AttnBlock(block_in), ResnetBlock(block_in, block_in))
        ups = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)  # taming prepends, so checkpoint index i is resolution level i
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


def to_uint8_image(x: torch.Tensor) -> torch.Tensor:
    """[1,3,H,W] in about [-1,1] -> uint8 [1,H,W,3], as custom_to_pil: its `astype(uint8)` truncates, never rounds.

    Same float32 ops in the same order; the explicit floor pins the truncation so the ONNX Cast cannot round.
    """
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    return torch.floor(x).to(torch.uint8).permute(0, 2, 3, 1)


class GumbelVQDecoder(nn.Module):
    """The decode half of taming's GumbelVQ: indices [1, 1024] -> image. Parameter names match `last.ckpt`."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.quantize = nn.Module()
        self.quantize.embed = nn.Embedding(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)
        self.ignored_keys: tuple[str, ...] = ()  # checkpoint keys load_vqgan skipped

    def lookup(self, indices: torch.LongTensor) -> torch.Tensor:
        """Codebook vectors as z [1, embed_dim, side, side]; indices are the grid in raster (b h w) order.

        Equals get_codebook_entry's one_hot(indices).float() @ embed.weight einsum, without the 8192-wide one-hot.
        """
        side = self.config.latent_side
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):  # eager only: in a graph shapes are fixed
            self._check(indices)
        return self.quantize.embed(indices).reshape(1, side, side, self.config.embed_dim).permute(0, 3, 1, 2)

    def _check(self, indices: torch.Tensor) -> None:
        n, side = self.config.num_tokens, self.config.latent_side
        if indices.numel() != n:
            raise UserError(f"the VQGAN decoder got {indices.numel()} image token indices; exactly {n} are required "
                            f"(one {side}x{side} latent grid)")
        if tuple(indices.shape) != (1, n) or indices.dtype not in (torch.int64, torch.int32):
            raise UserError(f"image token indices must be an int64 tensor of shape [1, {n}], "
                            f"got {indices.dtype} {list(indices.shape)}")
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self.config.n_embed:
            raise UserError(f"image token indices must lie in [0, {self.config.n_embed}), got [{lo}, {hi}]")

    def decode_float(self, indices: torch.LongTensor) -> torch.Tensor:
        """The decoder's float output [1, 3, 256, 256] before clamping (for parity metrics)."""
        return self.decoder(self.post_quant_conv(self.lookup(indices)))

    def forward(self, indices: torch.LongTensor) -> torch.Tensor:
        return to_uint8_image(self.decode_float(indices))


def _preview(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_state_dict(path: Path) -> dict:
    try:
        # weights_only: a checkpoint from the internet must not be able to run code when we open it
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"VQGAN checkpoint {path} not found (HealthGPT's README puts last.ckpt and model.yaml in "
                        f"taming_transformers/ckpt/)") from e
    except pickle.UnpicklingError as e:
        detail = " ".join(str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        if "Unsupported global" not in detail:  # garbage or a truncated download, not a Lightning pickle
            raise UserError(f"cannot read {path} as a torch checkpoint ({detail})") from e
        try:
            names = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # legacy (non-zip) format: name the first class torch tripped on
            names = re.search(r"GLOBAL (\S+)", detail).group(1)
        out = path.with_name(path.stem + ".weights" + path.suffix)
        raise UserError(
            f"{path} holds pickled Python objects besides tensors ({names}), and checkpoints are only opened with "
            f"weights_only=True so that they cannot run code; extract the weights once, in a trusted environment "
            f"that has those classes installed: python -c \"import torch; c = torch.load({str(path)!r}, "
            f"map_location='cpu', weights_only=False); torch.save({{'state_dict': c['state_dict']}}, {str(out)!r})\" "
            f"then put {out.name} in place of {path.name}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        detail = " ".join(str(e).split()) or "empty or truncated"
        raise UserError(f"cannot read {path} as a torch checkpoint: {detail}") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None  # Lightning nests it, a bare dict is fine
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds no state dict (found {type(ckpt).__name__})")
    return sd


def load_vqgan(ckpt_path: str | Path, yaml_path: str | Path) -> GumbelVQDecoder:
    """The decoder of a taming GumbelVQ `last.ckpt` described by `model.yaml`, fp32, eval mode."""
    ckpt_path, yaml_path = Path(ckpt_path), Path(yaml_path)
    model = GumbelVQDecoder(VQGANConfig.from_yaml(yaml_path))
    sd, expected = _read_state_dict(ckpt_path), model.state_dict()
    missing = sorted(k for k in expected if not isinstance(sd.get(k), torch.Tensor))
    if missing:
        raise UserError(f"{ckpt_path} lacks {len(missing)} VQGAN decoder weight(s): {_preview(missing)}; is it the "
                        f"GumbelVQ checkpoint that {yaml_path} describes?")
    # taming loads with strict=False, but an unknown decoder key means model.yaml describes another network
    unknown = sorted(k for k in sd if k not in expected and k.startswith(_DECODER_PREFIXES))
    if unknown:
        raise UserError(f"{ckpt_path} has decoder weight(s) that {yaml_path} does not describe: {_preview(unknown)}")
    bad = [f"{k} is {list(sd[k].shape)} in the checkpoint but {list(v.shape)} per the config"
           for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise UserError(f"{ckpt_path} does not match {yaml_path}: {_preview(bad, 5)}")
    model.load_state_dict({k: sd[k] for k in expected})  # copy_ casts any fp16 tensor to the fp32 parameters
    model.ignored_keys = tuple(sorted(set(sd) - set(expected)))
    log.info("VQGAN: loaded %d decoder tensors from %s, ignored %d others (encoder, quant_conv, loss, ...)",
             len(expected), ckpt_path, len(model.ignored_keys))
    return model.float().eval().requires_grad_(False)
