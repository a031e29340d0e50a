"""The VQGAN decoder: taming's config and key names, custom_to_pil's truncation, load errors, ONNX parity."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

from export.reference.vqgan import (
    GUMBEL_TARGET,
    GumbelVQDecoder,
    VQGANConfig,
    load_vqgan,
    to_uint8_image,
)
from export.synth.vqgan import random_vqgan, write_synthetic_vqgan
from runtime.contract.errors import UserError


class FakeCallback:  # stands in for the pytorch_lightning objects a real last.ckpt may pickle
    def __init__(self):
        self.best_model_score = 1.0


def _indices(seed: int = 0, n: int = 1024) -> torch.Tensor:
    return torch.randint(0, 8192, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqgan_tiny")
    write_synthetic_vqgan(out, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_vqgan(tiny_dir / "last.ckpt", tiny_dir / "model.yaml")


def _rewrite(tiny_dir, tmp_path, edit) -> tuple:
    ckpt = torch.load(tiny_dir / "last.ckpt", weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt", tiny_dir / "model.yaml"


# --- config -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [VQGANConfig.full(), VQGANConfig.tiny()], ids=["full", "tiny"])
def test_config_round_trips_through_taming_yaml(tmp_path, config):
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    assert VQGANConfig.from_yaml(tmp_path / "model.yaml") == config
    assert (config.latent_side, config.num_tokens, config.n_embed) == (32, 1024, 8192)


def test_full_config_is_the_reference_yaml(tmp_path):
    text = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.GumbelVQ
  params:
    kl_weight: 1.0e-08
    embed_dim: 256
    n_embed: 8192
    temperature_scheduler_config:
      target: taming.lr_scheduler.LambdaWarmUpCosineScheduler
      params: {warm_up_steps: 0, max_decay_steps: 1000001, lr_start: 0.9, lr_max: 0.9, lr_min: 1.0e-06}
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [32]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.DummyLoss
"""
    (tmp_path / "model.yaml").write_text(text)
    assert VQGANConfig.from_yaml(tmp_path / "model.yaml") == VQGANConfig.full()
    assert VQGANConfig.full().to_yaml_dict()["model"]["target"] == GUMBEL_TARGET


def test_config_errors_name_the_problem(tmp_path):
    doc = VQGANConfig.tiny().to_yaml_dict()
    del doc["model"]["params"]["ddconfig"]["ch_mult"]
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"model\.params\.ddconfig\.ch_mult"):
        VQGANConfig.from_yaml(tmp_path / "model.yaml")
    doc = VQGANConfig.tiny().to_yaml_dict()
    doc["model"]["target"] = "taming.models.vqgan.VQModel"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="GumbelVQ"):
        VQGANConfig.from_yaml(tmp_path / "model.yaml")
    with pytest.raises(UserError, match="cannot read"):
        VQGANConfig.from_yaml(tmp_path / "absent.yaml")


def test_full_geometry_matches_reference_decoder():
    with torch.device("meta"):  # shapes only: no 40M-parameter init
        sd = GumbelVQDecoder(VQGANConfig.full()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["quantize.embed.weight"] == (8192, 256)
    assert shapes["post_quant_conv.weight"] == (256, 256, 1, 1)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    # up[3] is 32x32 (512 ch, attention after each of its 3 blocks); up[0] is 256x256 and has no upsample
    blocks = [{k.split(".")[4] for k in shapes if k.startswith(f"decoder.up.{i}.block.")} for i in range(4)]
    assert blocks == [{"0", "1", "2"}] * 4
    assert {k.split(".")[4] for k in shapes if k.startswith("decoder.up.3.attn.")} == {"0", "1", "2"}
    assert not any(k.startswith(("decoder.up.0.attn.", "decoder.up.1.attn.", "decoder.up.2.attn.")) for k in shapes)
    assert shapes["decoder.up.2.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert not any("nin_shortcut" in k for k in shapes if k.startswith(("decoder.up.0.", "decoder.up.3.")))
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.norm_out.weight"] == (128,)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)


# --- decode -------------------------------------------------------------------------------------------------------

def test_decode_gives_a_256_rgb_uint8_image(tiny):
    image = tiny(_indices())
    assert image.shape == (1, 256, 256, 3) and image.dtype == torch.uint8
    assert image.float().std() > 20 and image.unique().numel() > 100  # random weights still draw a picture


def test_loaded_weights_are_the_written_ones(tiny):
    reference = random_vqgan(VQGANConfig.tiny(), seed=0)
    idx = _indices(3)
    assert torch.equal(tiny.decode_float(idx), reference.decode_float(idx))
    assert not torch.equal(tiny.decode_float(idx), random_vqgan(VQGANConfig.tiny(), seed=1).decode_float(idx))


def test_codebook_lookup_equals_taming_one_hot_einsum(tiny):
    idx = _indices(1)
    one_hot = torch.nn.functional.one_hot(idx.reshape(1, 32, 32), 8192).permute(0, 3, 1, 2).float()
    taming = torch.einsum("b n h w, n d -> b d h w", one_hot, tiny.quantize.embed.weight)
    assert torch.equal(tiny.lookup(idx), taming)
    # raster order: index k sits at row k // 32, column k % 32
    assert torch.equal(tiny.lookup(idx)[0, :, 1, 5], tiny.quantize.embed.weight[idx[0, 37]])


def test_postprocess_truncates_like_custom_to_pil():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 1.5, -0.9999])  # 0 -> 127.5 and 0.999 -> 254.87: truncation
    image = to_uint8_image(x.reshape(1, 1, 1, 7).expand(1, 3, 1, 7))
    assert image.shape == (1, 1, 7, 3)
    assert image[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 0]

    def custom_to_pil(t):  # HealthGPT's idx2img.custom_to_pil, without PIL
        t = torch.clamp(t, -1.0, 1.0)
        t = (t + 1.0) / 2.0
        return (255 * t[0].permute(1, 2, 0).numpy()).astype(np.uint8)

    rand = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.7
    assert np.array_equal(to_uint8_image(rand)[0].numpy(), custom_to_pil(rand))


@pytest.mark.parametrize("n", [1023, 1025, 576])
def test_exactly_1024_indices_are_required(tiny, n):
    with pytest.raises(UserError, match=rf"got {n} image token indices; exactly 1024 are required"):
        tiny(_indices(n=n))


def test_bad_index_values_and_layout_are_user_errors(tiny):
    with pytest.raises(UserError, match=r"\[0, 8192\)"):
        tiny(torch.full((1, 1024), 8192))
    with pytest.raises(UserError, match=r"shape \[1, 1024\]"):
        tiny(_indices().reshape(1024))


# --- loading ------------------------------------------------------------------------------------------------------

def test_non_decoder_keys_are_ignored_and_counted(tiny_dir, tmp_path):
    ckpt, yaml_path = _rewrite(tiny_dir, tmp_path, lambda sd: sd.update({"loss.logvar": torch.zeros(())}))
    model = load_vqgan(ckpt, yaml_path)
    assert model.ignored_keys == (
        "encoder.conv_in.weight", "encoder.conv_out.bias", "encoder.conv_out.weight", "loss.logvar",
        "quant_conv.bias", "quant_conv.weight", "quantize.proj.bias", "quantize.proj.weight")
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_bare_state_dict_and_fp16_weights_load(tiny_dir, tmp_path):
    sd = torch.load(tiny_dir / "last.ckpt", weights_only=True)["state_dict"]
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "bare.ckpt")
    model = load_vqgan(tmp_path / "bare.ckpt", tiny_dir / "model.yaml")
    assert model.quantize.embed.weight.dtype == torch.float32
    assert torch.equal(model.quantize.embed.weight, sd["quantize.embed.weight"].half().float())


def test_missing_decoder_keys_are_named(tiny_dir, tmp_path):
    gone = ["decoder.up.3.attn.0.q.weight", "post_quant_conv.bias"]
    ckpt, yaml_path = _rewrite(tiny_dir, tmp_path, lambda sd: [sd.pop(k) for k in gone])
    with pytest.raises(UserError) as err:
        load_vqgan(ckpt, yaml_path)
    assert str(ckpt) in str(err.value) and "lacks 2 " in str(err.value)
    assert "decoder.up.3.attn.0.q.weight, post_quant_conv.bias" in str(err.value)  # all of them, sorted


def test_many_missing_keys_are_truncated(tiny_dir, tmp_path):
    ckpt, yaml_path = _rewrite(tiny_dir, tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if "decoder.up" in k])
    with pytest.raises(UserError, match=r"\.\.\. and \d+ more"):
        load_vqgan(ckpt, yaml_path)


def test_shape_mismatch_names_key_and_shapes(tiny_dir, tmp_path):
    ckpt, yaml_path = _rewrite(tiny_dir, tmp_path, lambda sd: sd.update({"decoder.conv_out.bias": torch.zeros(4)}))
    with pytest.raises(UserError, match=r"decoder\.conv_out\.bias is \[4\] in the checkpoint but \[3\]"):
        load_vqgan(ckpt, yaml_path)


def test_unknown_decoder_keys_mean_the_wrong_config(tiny_dir, tmp_path):
    extra = {"decoder.up.0.block.2.conv1.weight": torch.zeros(32, 32, 3, 3)}  # a ckpt with num_res_blocks 2
    ckpt, yaml_path = _rewrite(tiny_dir, tmp_path, lambda sd: sd.update(extra))
    with pytest.raises(UserError, match=r"does not describe: decoder\.up\.0\.block\.2\.conv1\.weight"):
        load_vqgan(ckpt, yaml_path)


def test_lightning_pickle_with_objects_gets_extraction_advice(tiny_dir, tmp_path):
    ckpt = torch.load(tiny_dir / "last.ckpt", weights_only=True)
    ckpt["callbacks"] = {"ModelCheckpoint": FakeCallback()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(UserError) as err:
        load_vqgan(tmp_path / "last.ckpt", tiny_dir / "model.yaml")
    message = str(err.value)
    assert "FakeCallback" in message and "weights_only=False" in message and "\n" not in message
    command = message.split('python -c "')[1].split('"')[0]
    exec(command)  # the advice works: it writes last.weights.ckpt, which then loads
    model = load_vqgan(tmp_path / "last.weights.ckpt", tiny_dir / "model.yaml")
    assert torch.equal(model.quantize.embed.weight, ckpt["state_dict"]["quantize.embed.weight"])


@pytest.mark.parametrize("content", [b"", b"<html>not found</html>"], ids=["empty", "html"])
def test_unreadable_checkpoint_is_a_user_error(tiny_dir, tmp_path, content):
    (tmp_path / "last.ckpt").write_bytes(content)
    with pytest.raises(UserError, match="cannot read .* as a torch checkpoint"):
        load_vqgan(tmp_path / "last.ckpt", tiny_dir / "model.yaml")
    with pytest.raises(UserError, match="not found"):
        load_vqgan(tmp_path / "absent.ckpt", tiny_dir / "model.yaml")


def test_full_synthetic_checkpoint_loads_and_decodes(tmp_path):
    write_synthetic_vqgan(tmp_path, seed=0, config=VQGANConfig.full())
    model = load_vqgan(tmp_path / "last.ckpt", tmp_path / "model.yaml")
    assert model.config == VQGANConfig.full()
    image = model(_indices())
    assert image.shape == (1, 256, 256, 3) and image.float().std() > 20


# --- ONNX ---------------------------------------------------------------------------------------------------------

class _ImageAndFloat(torch.nn.Module):
    """forward's graph plus its float pre-image, so a differing pixel can be explained."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, indices):
        decoded = self.model.decode_float(indices)
        return to_uint8_image(decoded), decoded


def test_onnx_export_matches_torch(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    idx = _indices(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_ImageAndFloat(tiny), (idx,), tmp_path / "vqgan.onnx", dynamo=False, opset_version=17,
                          input_names=["indices"], output_names=["image", "decoded"])
    session = ort.InferenceSession(str(tmp_path / "vqgan.onnx"), providers=["CPUExecutionProvider"])
    image, decoded = session.run(None, {"indices": idx.numpy()})
    want_image, want_decoded = (t.numpy() for t in _ImageAndFloat(tiny)(idx))
    assert image.dtype == np.uint8 and image.shape == (1, 256, 256, 3)
    assert np.abs(decoded - want_decoded).max() < 1e-4
    # Bit-identical images are out of reach: ORT and torch sum GroupNorm/conv reductions in different orders
    # (max float diff ~2e-5). A pixel may differ by 1 only where the two floats straddle an integer.
    differ = image != want_image
    assert differ.mean() < 1e-3 and np.abs(image.astype(int) - want_image).max() <= 1
    to_255 = lambda f: (np.clip(f, -1, 1) + 1) / 2 * 255  # noqa: E731
    ours, theirs = to_255(decoded.transpose(0, 2, 3, 1)), to_255(want_decoded.transpose(0, 2, 3, 1))
    assert np.array_equal(np.floor(ours[differ]) != np.floor(theirs[differ]), np.ones(differ.sum(), bool))
