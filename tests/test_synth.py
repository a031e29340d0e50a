"""Synthetic checkpoints in the released layout (issue 15): the streaming safetensors writer, the base LLM as two bf16
shards with HF's index (as Phi-3-mini comes), read by the reference with every key accounted for, and a broken index
refused where the checkpoint is found."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import ROOT, assert_user_error
from transformers import Phi3Config, Phi3ForCausalLM

from export.reference.checkpoint import SAFETENSORS, SAFETENSORS_INDEX, CheckpointPaths
from export.reference.model import load_reference
from export.synth.checkpoint import SIZES, base_config, base_weights, synthesize
from export.synth.shards import split, write_model
from runtime.contract.errors import UserError

BASE = "Phi-3-mini-4k-instruct"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny m3 checkpoint of conftest's m3_checkpoint (seed 0), its base in two bf16 shards."""
    return synthesize(tmp_path_factory.mktemp("sharded") / "m3", "m3", "tiny", seed=0, dtype=torch.bfloat16,
                      shards=2).root


def _headers(base) -> dict[str, dict]:
    out = {}
    for name in SHARDS:
        with safe_open(base / name, "pt") as f:
            out[name] = {"metadata": f.metadata(), "tensors": {k: f.get_slice(k) for k in f.keys()}}
    return out


def test_writer_round_trips_through_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.weight": torch.randn(7), "c": torch.randn(2, 3, 4), "d": torch.randn(11)}
    entries = [(k, tuple(t.shape)) for k, t in tensors.items()]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = tmp_path / str(dtype)
        out.mkdir()
        write_model(out, entries, lambda name, shape: tensors[name], dtype, shards=3)
        index = json.loads((out / SAFETENSORS_INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() for t in tensors.values()) * dtype.itemsize
        for key, shard in index["weight_map"].items():
            with safe_open(out / shard, "pt") as f:
                assert f.metadata() == {"format": "pt"}
                assert torch.equal(f.get_tensor(key), tensors[key].to(dtype))
    assert [len(g) for g in split(entries, torch.float32, 2)] == [2, 2]  # 15+7 | 24+11 floats: consecutive, balanced


def test_sharded_base_is_what_hf_writes_and_the_index_says(sharded):
    base = sharded / BASE
    config = json.loads((base / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Phi3ForCausalLM"]
    assert not (base / SAFETENSORS).exists()
    index = json.loads((base / SAFETENSORS_INDEX).read_text())
    headers = _headers(base)
    with torch.device("meta"):
        expected = Phi3ForCausalLM(Phi3Config.from_pretrained(base)).state_dict()  # from the config it wrote
    assert list(index["weight_map"]) == list(expected)  # HF's names, in state-dict order
    for key, shard in index["weight_map"].items():
        assert [s for s, h in headers.items() if key in h["tensors"]] == [shard]  # in exactly the shard named
        view = headers[shard]["tensors"][key]
        assert view.get_dtype() == "BF16" and view.get_shape() == list(expected[key].shape)
    assert all(h["metadata"] == {"format": "pt"} and h["tensors"] for h in headers.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in expected.values())


def test_bf16_shards_are_the_fp32_file_rounded_and_load_as_one(sharded, m3_checkpoint, m3_com, tmp_path):
    """Same seed, same tensors whatever the layout: the default fp32 file rounded to bf16, written as one fp32 file
    by the safetensors library, gives a reference equal to the sharded one bit for bit; unrounded, it differs."""
    fp32 = load_file(m3_checkpoint / BASE / SAFETENSORS)
    one_file = shutil.copytree(sharded, tmp_path / "one")
    for name in (*SHARDS, SAFETENSORS_INDEX):
        (one_file / BASE / name).unlink()
    save_file({k: t.to(torch.bfloat16).float() for k, t in fp32.items()}, one_file / BASE / SAFETENSORS,
              metadata={"format": "pt"})
    a, b = load_reference(sharded, "com"), load_reference(one_file, "com")
    for (ka, ta), (kb, tb) in zip(a.llm.state_dict().items(), b.llm.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb), ka
    embeds = torch.randn(1, 9, a.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [ref.llm(inputs_embeds=embeds).logits for ref in (a, b, m3_com)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2], atol=1e-4)  # the comparison sees bf16 rounding of the base


def _edit_index(ck, edit):
    path = ck / BASE / SAFETENSORS_INDEX
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def _rewrite_shard(ck, shard, edit):
    path = ck / BASE / shard
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


STRAY = "model.layers.7.mlp.down_proj.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda ck: _edit_index(ck, lambda m: m.update({"lm_head.weight": "model-00003-of-00002.safetensors"})),
     r"cannot load the base LLM: .*index.json places lm_head.weight in model-00003-of-00002.safetensors, which does "
     "not exist"),
    (lambda ck: _edit_index(ck, lambda m: m.update({STRAY: SHARDS[0]})),
     rf"cannot load the base LLM: .*{SHARDS[0]} does not hold {STRAY}, which model.safetensors.index.json places"),
    (lambda ck: _edit_index(ck, lambda m: m.update({"x": "../x.safetensors"})), "has no weight_map of tensor names"),
    (lambda ck: (ck / BASE / SHARDS[1]).write_bytes((ck / BASE / SHARDS[1]).read_bytes()[:-10]),
     rf"{SHARDS[1]} is \d+ bytes but its header accounts for \d+ \(truncated download\?\)"),
])
def test_a_broken_index_or_shard_is_named_when_the_checkpoint_is_found(sharded, tmp_path, edit, match):
    ck = shutil.copytree(sharded, tmp_path / "ck")
    edit(ck)
    with pytest.raises(UserError, match=match):
        CheckpointPaths.find(ck)


@pytest.mark.parametrize("edit,match", [
    (lambda ck: (_rewrite_shard(ck, SHARDS[1], lambda t: t.pop("lm_head.weight")),
                 _edit_index(ck, lambda m: m.pop("lm_head.weight"))), r"1 missing keys \(lm_head.weight\)"),
    (lambda ck: (_rewrite_shard(ck, SHARDS[0], lambda t: t.update({STRAY: torch.zeros(4, 4, dtype=torch.bfloat16)})),
                 _edit_index(ck, lambda m: m.update({STRAY: SHARDS[0]}))), rf"1 unexpected keys \({STRAY}\)"),
])
def test_the_reference_accounts_for_every_key_of_the_shards(sharded, tmp_path, edit, match):
    ck = shutil.copytree(sharded, tmp_path / "ck")
    edit(ck)
    CheckpointPaths.find(ck)  # a consistent index: left to the loader's accounting
    with pytest.raises(UserError, match=f"the base LLM at .*{match}"):
        load_reference(ck, "com")


def test_full_size_is_phi3_minis_geometry_in_two_shards():
    """The full M3 base as declared (its 7.6 GB is written by `build.py synth --size full`, a benchmark step):
    Phi-3-mini-4k-instruct's 3,821,079,552 parameters, two bf16 shards, HF's init."""
    config = base_config("m3", SIZES["m3", "full"])
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (
        32, 3072, 8192, 32064)
    entries, make = base_weights(config, seed=0)
    assert sum(torch.Size(s).numel() for _, s in entries) == 3_821_079_552
    assert SIZES["m3", "full"].dtype == torch.bfloat16 and SIZES["m3", "full"].shards == 2
    groups = split(entries, torch.bfloat16, 2)
    assert [g[0][0] for g in groups][0] == "model.embed_tokens.weight" and groups[1][-1][0] == "lm_head.weight"
    w = make("model.layers.31.mlp.down_proj.weight", (3072, 8192))
    assert abs(w.std().item() - 0.02) < 1e-4 and torch.equal(make("model.norm.weight", (3072,)), torch.ones(3072))
    assert not make("model.embed_tokens.weight", (32064, 3072))[32000].any()  # pad_token_id's row, as HF inits it


@pytest.mark.parametrize("variant,fragments", [
    ("l14", ("size 'full' is written for m3 only",)),
    ("l15", ("argument --variant: invalid choice: 'l15'",)),
])
def test_build_py_synth_full_refuses_a_bad_variant_in_one_line(tmp_path, variant, fragments):
    out = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "build.py", "synth", "--size", "full", "--variant", variant, "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_user_error(proc, *fragments)
    assert not out.exists() and not (tmp_path / "ck.partial").exists()
