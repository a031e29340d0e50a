"""Issue 3's independent cross-check: with H-LoRA left out and the vocabulary at the base size, our decoder graph
(export/compile/graphs.py: the in-place cache buffer in, new rows out) gives the same logits as optimum-onnx's
`text-generation-with-past` export of the same base Phi-3, over a prefill and 8 greedy decode steps.

The two graphs share nothing but the weights on disk: optimum traces HF's own Phi3ForCausalLM (growing cache,
attention_mask + position_ids, token ids in), we trace our own forward (inputs_embeds + past_length in). Both run in
ONNX Runtime on CPU; ours is driven through runtime.core.kvcache.KVCache exactly as runtime/core/generate.py drives it.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.compile import specs
from export.compile.graphs import DecoderGraph
from export.compile.onnx_export import export_graph
from export.reference.checkpoint import CheckpointPaths
from runtime.contract.graphspec import GraphSpec
from runtime.core.backend import OrtBackend
from runtime.core.kvcache import KVCache

MAX_CONTEXT = 64
PROMPT = 12
DECODE_STEPS = 8
ATOL = 1e-4


@pytest.fixture
def offline(monkeypatch):
    """No hub access, whatever was imported first (transformers caches the flag at import time)."""
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
    assert transformers.utils.is_offline_mode()


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, len(os.sched_getaffinity(0)))
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class CpuCache:
    """What KVCache needs from a backend (host numpy buffers, rows written in place): OrtBackend's own methods."""

    buffer = OrtBackend.buffer
    head = OrtBackend.head
    write = OrtBackend.write


def export_ours(llm, path) -> GraphSpec:
    spec = specs.decoder_of(llm, MAX_CONTEXT, "float32")
    feeds = spec.sample_inputs(np.random.default_rng(0), seq=5)
    feeds["past_length"] = np.array([3], dtype=np.int64)
    model = export_graph(spec, DecoderGraph(llm, MAX_CONTEXT), feeds)
    onnx.save(model, str(path))
    return spec


def export_optimum(base, out) -> None:
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=str(base), output=str(out), task="text-generation-with-past", opset=17,
                device="cpu", dtype="fp32", local_files_only=True, do_validation=False, monolith=False)


def base_dir(variant: str, window: int | None, request, tmp_path):
    """The synthetic checkpoint's plain base LLM folder; with `window`, a copy whose sliding_window is that small,
    so that the window mask (2047 for Phi-3-mini, out of reach at MAX_CONTEXT) is compared too."""
    base = CheckpointPaths.find(request.getfixturevalue(f"{variant}_checkpoint")).base
    if window is None:
        return base
    copy = shutil.copytree(base, tmp_path / base.name)
    config = json.loads((copy / "config.json").read_text())
    config["sliding_window"] = window
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def run_both(ours, theirs, spec: GraphSpec, table: np.ndarray, vocab: int) -> dict:
    """A prefill then DECODE_STEPS greedy steps on both graphs (greedy on optimum's logits, fed to both): per step
    the largest logit and new-KV-row differences, optimum's logit scale, both greedy tokens; the cache length."""
    their_inputs = {i.name for i in theirs.get_inputs()}
    their_outputs = [o.name for o in theirs.get_outputs()]
    cache = KVCache(CpuCache(), spec)
    assert cache.capacity == MAX_CONTEXT
    _, kv_heads, head_dim = spec.tensor(cache.pairs[0][0]).shape  # ours: [cache, kv_heads, head_dim]
    past = {name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name, _ in cache.pairs}  # optimum's names
    ids = np.random.default_rng(1234).integers(0, vocab, size=(1, PROMPT), dtype=np.int64)
    out: dict = {"diffs": [], "kv": [], "scales": [], "tokens": [], "ours": []}
    for _ in range(1 + DECODE_STEPS):
        length, seq = cache.length, ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + seq), np.int64), **past}
        if "position_ids" in their_inputs:
            feeds["position_ids"] = np.arange(length, length + seq, dtype=np.int64)[None]
        theirs_out = dict(zip(their_outputs, theirs.run(their_outputs, feeds)))
        their_logits = theirs_out["logits"][:, -1]  # [1, vocab]

        cache.check_room(seq)
        ours_out = dict(zip(spec.output_names, ours.run(spec.output_names, {
            "inputs_embeds": table[ids], **cache.feeds()})))
        our_logits = ours_out["logits"]
        assert our_logits.shape == their_logits.shape == (1, vocab)

        out["diffs"].append(float(np.abs(our_logits - their_logits).max()))
        out["scales"].append(float(np.abs(their_logits).max()))
        # the new K/V rows too: ours are exactly the rows optimum's growing cache gained this step
        out["kv"].append(max(float(np.abs(ours_out[present]
                                       - theirs_out[present][0, :, length:].transpose(1, 0, 2)).max())
                             for _, present in cache.pairs))
        cache.update(ours_out)
        past = {name: theirs_out[present] for name, present in cache.pairs}

        token = int(their_logits[0].argmax())  # greedy on optimum's logits, fed to both
        out["tokens"].append(token)
        out["ours"].append(int(our_logits[0].argmax()))
        ids = np.array([[token]], dtype=np.int64)
    out["length"] = cache.length
    return out


@pytest.mark.parametrize("variant,window", [("m3", None), ("l14", None), ("m3", 5)],
                         ids=["phi3-mha", "phi4-gqa", "phi3-window5"])
def test_decoder_matches_optimum_export(variant, window, request, tmp_path, offline):
    from transformers import Phi3ForCausalLM

    start = time.perf_counter()
    base = base_dir(variant, window, request, tmp_path)
    llm = Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager",
                                          local_files_only=True).eval()
    cfg = llm.config
    assert not hasattr(llm.model.layers[0].self_attn.qkv_proj, "lora_A")  # the plain base: no H-LoRA anywhere
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    table = llm.model.embed_tokens.weight.detach().numpy()
    assert table.shape[0] == cfg.vocab_size  # base vocabulary, not HealthGPT's extended one

    spec = export_ours(llm, tmp_path / "decoder.onnx")
    export_optimum(base, tmp_path / "optimum")
    optimum_path = tmp_path / "optimum" / "model.onnx"
    assert optimum_path.is_file(), sorted(p.name for p in (tmp_path / "optimum").iterdir())
    ours, theirs = session(tmp_path / "decoder.onnx"), session(optimum_path)
    their_inputs = {i.name for i in theirs.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= their_inputs, their_inputs

    steps = run_both(ours, theirs, spec, table, cfg.vocab_size)
    diffs, kv_diffs, scales, tokens, ours_greedy = (steps[k] for k in ("diffs", "kv", "scales", "tokens", "ours"))
    elapsed = time.perf_counter() - start
    variant = f"{variant}, window {cfg.sliding_window}"
    print(f"\n[{variant}] layers={layers} heads={cfg.num_attention_heads} kv_heads={kv_heads} vocab={cfg.vocab_size} "
          f"prompt={PROMPT} decode={DECODE_STEPS} tokens={tokens}")
    print(f"[{variant}] max|logit|={max(scales):.4f}  max abs logit diff per step (0=prefill): "
          + " ".join(f"{d:.2e}" for d in diffs))
    print(f"[{variant}] max abs new-KV-row diff per step: " + " ".join(f"{d:.2e}" for d in kv_diffs))
    print(f"[{variant}] overall max logit diff {max(diffs):.3e}, max KV diff {max(kv_diffs):.3e}, {elapsed:.1f} s")
    assert steps["length"] == PROMPT + DECODE_STEPS
    assert max(diffs) <= ATOL, f"logits differ from optimum's by {max(diffs):.3e} (per step: {diffs})"
    assert max(kv_diffs) <= ATOL, f"new K/V rows differ from optimum's by {max(kv_diffs):.3e} (per step: {kv_diffs})"
    assert ours_greedy == tokens, f"greedy tokens differ: ours {ours_greedy}, optimum's {tokens}"
