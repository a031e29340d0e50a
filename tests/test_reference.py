"""The PyTorch reference: H-LoRA math, loading the release layout, CLIP layer choice, vocabulary, generation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from export.reference.checkpoint import PEFT_PREFIX
from export.reference.hlora import FoldedHLora, HLoraLinear
from export.reference.model import load_reference
from export.reference.variants import VARIANTS, get_task
from runtime.contract.errors import UserError
from runtime.core.image import load_image
from runtime.core.prompt import vq_indices


def per_expert(layer: HLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """Independent formulation: y = W x + sum_e g_e(x) * s * B_e A_e x."""
    t = layer.rank // layer.experts
    g = torch.softmax(x @ layer.lora_route.weight.T, dim=-1)
    y = x @ layer.weight.T
    for e in range(layer.experts):
        a_e = layer.lora_A.weight[e * t:(e + 1) * t]
        b_e = layer.lora_B.weight[:, e * t:(e + 1) * t]
        y = y + g[..., e:e + 1] * layer.scaling * ((x @ a_e.T) @ b_e.T)
    return y


@pytest.mark.parametrize("rank,alpha", [(64, 128), (256, 512)])
def test_hlora_matches_per_expert_form_at_m3_shapes(rank, alpha):
    torch.manual_seed(0)
    base = nn.Linear(3072, 9216, bias=False)  # qkv_proj of Phi-3-mini
    layer = HLoraLinear(base, rank, alpha)
    for m in (layer.lora_A, layer.lora_B, layer.lora_route):
        nn.init.normal_(m.weight, std=0.05)
    x = torch.randn(1, 7, 3072, dtype=torch.float64)
    layer = layer.double()
    assert layer.scaling == 8.0
    ref = per_expert(layer, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(FoldedHLora(layer)(x), ref, rtol=1e-10, atol=1e-10)
    # the LoRA term is not negligible, so the comparison says something
    assert (ref - x @ layer.weight.T).abs().max() > 1e-2


def test_variant_table():
    assert [(t.rank, t.alpha, t.clip_layer) for t in VARIANTS["m3"].tasks.values()] == [(64, 128, -2), (256, 512, 1)]
    assert VARIANTS["l14"].tasks["com"].rank == 32 and VARIANTS["l14"].template == "phi4_instruct"
    with pytest.raises(UserError, match="no gen checkpoint"):
        get_task(VARIANTS["l14"], "gen")


def test_loaded_weights_follow_release_keys(m3_checkpoint, m3_com, m3_gen):
    sd = torch.load(m3_checkpoint / "HealthGPT-M3" / "com_hlora_weights.bin", weights_only=True)
    key = f"{PEFT_PREFIX}model.layers.1.mlp.down_proj.lora_route.weight"
    assert sd[key].dtype == torch.bfloat16
    torch.testing.assert_close(m3_com.llm.model.layers[1].mlp.down_proj.lora_route.weight, sd[key].float())
    proj = sd[f"{PEFT_PREFIX}model.mm_projector.2.weight"].float()
    torch.testing.assert_close(m3_com.projector[2].weight, proj)
    assert not torch.equal(m3_gen.projector[2].weight, proj)  # each task has its own projector
    fusion = torch.load(m3_checkpoint / "HealthGPT-M3" / "fusion_layer_weights.bin", weights_only=True)
    torch.testing.assert_close(m3_gen.llm.lm_head.weight, fusion[f"{PEFT_PREFIX}lm_head.weight"].float())


def test_removed_route_key_is_named(m3_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(m3_checkpoint, bad)
    path = bad / "HealthGPT-M3" / "com_hlora_weights.bin"
    sd = torch.load(path, weights_only=True)
    key = f"{PEFT_PREFIX}model.layers.0.self_attn.o_proj.lora_route.weight"
    del sd[key]
    torch.save(sd, path)
    with pytest.raises(UserError, match=f"com_hlora_weights.bin is missing 1 key.*{key.replace('.', '[.]')}"):
        load_reference(bad, "com")


def test_mean_rows(m3_checkpoint, m3_com):
    base = load_file(next((m3_checkpoint / "Phi-3-mini-4k-instruct").glob("*.safetensors")))
    for name, w in (("model.embed_tokens.weight", m3_com.llm.model.embed_tokens.weight),
                    ("lm_head.weight", m3_com.llm.lm_head.weight)):
        assert w.shape[0] == 40206
        torch.testing.assert_close(w[:32011], base[name][:32011])
        mean = base[name][:32011].mean(dim=0)
        torch.testing.assert_close(w[32011:], mean.expand(40206 - 32011, -1))  # padding rows 32011.. overwritten


@pytest.mark.parametrize("task", ["com", "gen"])
def test_clip_layer_equals_hidden_states_indexing(task, m3_com, m3_gen):
    from export.compile.graphs import VisionGraph

    ref = {"com": m3_com, "gen": m3_gen}[task]
    pv = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hs = ref.clip(pv, output_hidden_states=True).hidden_states
        layer = {"com": len(hs) - 2, "gen": 1}[task]
        want = ref.projector(hs[layer][:, 1:])
        graph = VisionGraph(ref)
        assert len(graph.blocks) == layer
        torch.testing.assert_close(graph(pv), want)
        torch.testing.assert_close(ref.encode_image(pv), want)
    assert want.shape == (1, 576, ref.llm.config.hidden_size)


def test_idx_mapping(m3_gen):
    assert m3_gen.tokenizer.convert_tokens_to_ids(["<start_index>", "<idx_0>", "<idx_8191>", "<end_index>"]) == \
        [32011, 32012, 40203, 40204]
    ids = [32012 + i % 8192 for i in range(1024)] + [40204]
    assert vq_indices(ids, m3_gen.idx0) == [i % 8192 for i in range(1024)]
    with pytest.raises(UserError, match="produced 1023 image tokens and 1 other"):
        vq_indices(ids[1:], m3_gen.idx0)


def test_greedy_is_deterministic_and_reference_runs_end_to_end(m3_com, m3_gen, m3_gen_tokens, ct_small):
    image = load_image(ct_small)
    a = m3_com.answer(image, "What is shown?", max_new_tokens=12)
    assert a == m3_com.answer(image, "What is shown?", max_new_tokens=12)
    assert isinstance(a, str)
    assert len(m3_gen_tokens) == 1024 and all(m3_gen.idx0 <= t < m3_gen.idx0 + 8192 for t in m3_gen_tokens)
    img = m3_gen.vqgan(torch.tensor([vq_indices(m3_gen_tokens, m3_gen.idx0)]))[0].numpy()
    assert img.shape == (256, 256, 3) and img.dtype == np.uint8 and img.std() > 0
    with pytest.raises(UserError, match="image tokens"):
        m3_gen.generate_image(image, "Reconstruct the image.", max_new_tokens=8)
