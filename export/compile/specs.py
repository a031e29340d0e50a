"""Every graph of the bundle, declared once. The exporter writes these into the manifest; engines/, runtime/ and the
verifier read them back from there (runtime.contract.graphspec.GraphSpec.from_json)."""

from __future__ import annotations

from runtime.contract.graphspec import Dim, GraphSpec, TensorSpec, Tolerance
from runtime.contract.healthgpt import IMAGE_PATCHES, IMAGE_SIZE, IMAGE_TOKENS, OUT_SIZE, VQ_CODES


def vision(hidden: int, dtype: str) -> GraphSpec:
    """pixel_values -> the task's projected image features (CLIP cut after the task's block, projector inside)."""
    return GraphSpec(
        name="vision",
        inputs=(TensorSpec("pixel_values", "float32", (1, 3, IMAGE_SIZE, IMAGE_SIZE)),),
        outputs=(TensorSpec("image_embeds", dtype, (1, IMAGE_PATCHES, hidden)),),
        tolerance=Tolerance(max_abs=1e-3, min_cosine=0.99999),
    )


def embed(hidden: int, vocab: int, max_context: int, dtype: str) -> GraphSpec:
    """input_ids -> inputs_embeds: the task's table (COM: base + mean rows; GEN: fusion), run where the decoder runs."""
    return GraphSpec(
        name="embed",
        inputs=(TensorSpec("input_ids", "int64", (1, "seq"), values=(0, vocab)),),
        outputs=(TensorSpec("inputs_embeds", dtype, (1, "seq", hidden)),),
        dims={"seq": Dim(1, min(64, max_context), max_context)},
        tolerance=Tolerance(max_abs=0.0, min_cosine=0.999999),  # a gather: exact (cosine only for rounding)
    )


def kv_pairs(layers: int) -> tuple[tuple[str, str], ...]:
    """(cache input, new-rows output) per layer and kind, in graph order; names as ORT GenAI's genai_config writes
    them."""
    return tuple((f"past_key_values.{i}.{kind}", f"present.{i}.{kind}") for i in range(layers)
                 for kind in ("key", "value"))


def decoder(layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, max_context: int,
            dtype: str) -> GraphSpec:
    """One step over `seq` new positions. Reads the runtime's KV rows ([cache, kv_heads, head_dim], rows outermost;
    rows >= past_length masked) and returns last-position logits and only the new K/V rows [seq, kv_heads, head_dim],
    which the runtime writes at [past_length, past_length + seq): the graph never copies the cache. `cache` is the
    number of rows bound: the context's past_length (runtime/core/kvcache.py binds that many rows of its buffer, one
    contiguous view), one masked row for a prefill from an empty context."""
    cache, pairs = ("cache", kv_heads, head_dim), kv_pairs(layers)
    return GraphSpec(
        name="decoder",
        inputs=(TensorSpec("inputs_embeds", dtype, (1, "seq", hidden)),
                TensorSpec("past_length", "int64", (1,), values=(0, 1)),
                *(TensorSpec(past, dtype, cache) for past, _ in pairs)),
        outputs=(TensorSpec("logits", "float32", (1, vocab)),
                 *(TensorSpec(present, dtype, ("seq", kv_heads, head_dim)) for _, present in pairs)),
        dims={"seq": Dim(1, min(64, max_context), max_context), "cache": Dim(1, max_context, max_context)},
        # TensorRT: prefill (from an empty, one-row cache) and single-token decode want different kernels (anchors.md).
        profiles=({"seq": Dim(1, min(640, max_context), max_context), "cache": Dim(1, 1, max_context)},
                  {"seq": Dim(1, 1, 1)}),
        tolerance=Tolerance(max_abs=1e-3, min_cosine=0.99999),
        kv_pairs=pairs,
    )


def decoder_of(llm, max_context: int, dtype: str) -> GraphSpec:
    """The decoder spec of a loaded Phi-3 (its HF config and LM head): for the exporter and the benchmarks' variants."""
    cfg = llm.config
    return decoder(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                   cfg.hidden_size, llm.lm_head.weight.shape[0], max_context, dtype)


def vqgan() -> GraphSpec:
    """1024 VQ indices in raster order -> 256x256 RGB uint8, clamp/scale/truncate inside the graph (fp32 always)."""
    return GraphSpec(
        name="vqgan",
        inputs=(TensorSpec("indices", "int64", (1, IMAGE_TOKENS), values=(0, VQ_CODES)),),
        outputs=(TensorSpec("image", "uint8", (1, OUT_SIZE, OUT_SIZE, 3)),),
        tolerance=Tolerance(max_abs=1.0, min_cosine=0.9999),
    )
