"""The contenders run in this process: our runtime's graphs (as shipped, as variants, under other ORT session
settings), the PyTorch reference, and optimum-onnx's ORTModelForCausalLM. Each gives `Case`s for timing.bench."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.timing import Case, rss_bytes
from runtime.core.backend import OrtBackend, OrtGraph
from runtime.core.bundle import Bundle
from runtime.core.generate import decode_one_token, forward
from runtime.core.kvcache import KVCache

TOKEN = 1000  # any id below every vocabulary; decode cost does not depend on it


# ---------------------------------------------------------------- our runtime
@dataclass
class OurDecoder:
    """A decoder graph + its KVCache, driven exactly as runtime/core/generate.py drives it. full_cache: the cache held
    at max_context rows at every context (the design before the cache grew by powers of two), for comparison."""

    graph: OrtGraph
    embed: OrtGraph
    cache: KVCache
    weight_bytes: int
    rss_delta: int = 0
    full_cache: bool = False

    def at(self, context: int) -> None:
        """The cache as the runtime has it after `context` tokens (rows >= length are masked: contents do not
        matter): shipped, the power of two above; full_cache, capacity rows."""
        want = self.cache.capacity if self.full_cache else self.cache.rows_for(context)
        if self.cache.rows != want:
            self.cache.reset()
            self.cache.reserve(want)
        self.cache.length = context

    def decode_case(self, context: int, concat_copy: bool = False) -> Case:
        if not concat_copy:
            return Case(lambda: decode_one_token(self.graph, self.embed, self.cache, TOKEN), lambda: self.at(context))

        def step():  # the shipped step, plus what a concat graph (present = concat(past, new)) costs extra
            x = self.embed.run({"input_ids": np.array([[TOKEN]], dtype=np.int64)})["inputs_embeds"]
            out = self.graph.run({"inputs_embeds": x, **self.cache.feeds()})
            for past, present in self.cache.pairs:
                np.concatenate([self.cache.buffers[past][:context], out[present]], axis=0)
            self.cache.update(out)
            return out["logits"]

        return Case(step, lambda: self.at(context))

    def prefill_case(self, embeds: np.ndarray) -> Case:
        return Case(lambda: forward(self.graph, self.cache, embeds), lambda: self.at(0))

    def kv_bytes_read(self, context: int) -> int:
        """Only the cached rows are bound (one masked row for an empty context), whatever the buffer's size."""
        per_row = sum(b.nbytes // b.shape[0] for b in self.cache.buffers.values())
        return per_row * max(context, 1)


def graph_weight_bytes(bundle: Bundle, task: str, name: str) -> int:
    tensors = bundle.manifest.weights.tensors
    return sum(tensors[t].nbytes for t in bundle.entry(task, name).initializers)


def our_decoder(bundle: Bundle, task: str, embed: OrtGraph, threads: int, backend: OrtBackend | None = None,
                settings: dict | None = None) -> OurDecoder:
    """settings=None: the shipped path, OrtBackend('cpu', threads).load (add_initializer over the mmap).
    Otherwise a session over the same file with those settings (see session(); `backend` holds the shared mmap)."""
    before = rss_bytes()
    if settings is None:
        backend = OrtBackend("cpu", threads)
        graph = backend.load(bundle, task, "decoder")
    else:
        graph = session(bundle, task, "decoder", backend, threads, **settings)
    cache = KVCache(OrtBackend("cpu", threads), graph.spec)  # host buffers, rows written in place
    dec = OurDecoder(graph, embed, cache, graph_weight_bytes(bundle, task, "decoder"))
    dec.at(min(600, cache.capacity - 1))
    decode_one_token(dec.graph, dec.embed, dec.cache, TOKEN)  # first run: lazy allocations land in the RSS figure
    dec.rss_delta = rss_bytes() - before
    return dec


LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
          "disable": "ORT_DISABLE_ALL"}


def session(bundle: Bundle, task: str, name: str, backend: OrtBackend | None, threads: int, *, opt: str = "all",
            mem_pattern: bool = True, weights: str = "shared", prepack: bool = True,
            spinning: bool | None = None) -> OrtGraph:
    """One ORT CPU session of a bundle graph with the given settings. weights='shared': the bundle's mmap handed in
    with add_initializer (what OrtBackend does; `backend` holds the OrtValues); weights='own': a plain
    InferenceSession(path) that loads the external data itself."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[opt])
    opts.enable_mem_pattern = mem_pattern
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    shared = backend.shared_weights(bundle) if weights == "shared" else None  # OrtValues over the bundle's mmap
    for tensor in bundle.entry(task, name).initializers if shared else ():
        opts.add_initializer(tensor, shared[tensor])
    s = ort.InferenceSession(str(bundle.path(task, name)), opts, providers=["CPUExecutionProvider"])
    return OrtGraph(s, bundle.spec(task, name), shared)


# ---------------------------------------------------------------- PyTorch reference (HF Phi3ForCausalLM)
class TorchDecoder:
    """HF model forward, one token, DynamicCache (what HF generate runs per step; generate's Python around it,
    logits processors and stopping criteria excluded). The cache is cropped back to `context` before each step."""

    def __init__(self, llm):
        import torch

        self.torch, self.llm = torch, llm
        cfg = llm.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.embed = llm.model.embed_tokens
        self.weight_bytes = sum(p.numel() * p.element_size() for n, p in llm.named_parameters()
                                if "embed_tokens" not in n)
        self.cache = None

    def _cache(self, context: int):
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache(config=self.llm.config)  # as generate() builds it
        g = torch.Generator().manual_seed(0)
        for i in range(self.layers):
            k, v = (torch.randn(1, self.kv_heads, context, self.head_dim, generator=g) for _ in range(2))
            cache.update(k, v, i)
        return cache

    def decode_case(self, context: int) -> Case:
        torch = self.torch
        cache = self._cache(context)
        ids = torch.tensor([[TOKEN]])
        mask = torch.ones(1, context + 1, dtype=torch.long)
        pos = torch.tensor([[context]])

        def step():
            with torch.inference_mode():
                e = self.embed(ids)
                out = self.llm(inputs_embeds=e, past_key_values=cache, attention_mask=mask, position_ids=pos,
                               cache_position=pos[0], use_cache=True, logits_to_keep=1)
                return int(out.logits[0, -1].argmax())

        return Case(step, lambda: cache.crop(context))

    def prefill_case(self, embeds: np.ndarray) -> Case:
        torch = self.torch
        x = torch.from_numpy(embeds)
        mask = torch.ones(1, x.shape[1], dtype=torch.long)

        def step():
            from transformers import DynamicCache

            with torch.inference_mode():
                cache = DynamicCache(config=self.llm.config)
                out = self.llm(inputs_embeds=x, attention_mask=mask, past_key_values=cache, use_cache=True,
                               logits_to_keep=1)
                return out.logits

        return Case(step)

    def kv_bytes_read(self, context: int) -> int:
        return 2 * self.layers * self.kv_heads * context * self.head_dim * 4


# ---------------------------------------------------------------- optimum-onnx
class OptimumDecoder:
    """optimum's ORTModelForCausalLM (its `text-generation-with-past` export of the plain base model) on this venv's
    onnxruntime-gpu, CPU provider: token ids in, growing past -> present (concat) out, IO binding off (CPU)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        before = rss_bytes()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.model = ORTModelForCausalLM.from_pretrained(path, provider="CPUExecutionProvider", session_options=so,
                                                         use_cache=True, use_io_binding=False, local_files_only=True)
        import onnx

        m = onnx.load(str(path / "model.onnx"), load_external_data=False)
        self.weight_bytes = _initializer_bytes(path, m, exclude=("embed_tokens",))
        cfg = self.model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        import torch

        self.torch = torch
        self.decode_case(16).step()
        self.rss_delta = rss_bytes() - before

    def decode_case(self, context: int) -> Case:
        torch = self.torch
        past = tuple((torch.zeros(1, self.kv_heads, context, self.head_dim),
                      torch.zeros(1, self.kv_heads, context, self.head_dim)) for _ in range(self.layers))
        ids, mask = torch.tensor([[TOKEN]]), torch.ones(1, context + 1, dtype=torch.long)
        pos = torch.tensor([[context]])
        return Case(lambda: self.model(input_ids=ids, attention_mask=mask, past_key_values=past, position_ids=pos,
                                       use_cache=True).logits)

    def prefill_case(self, seq: int) -> Case:
        torch = self.torch
        ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, seq, dtype=torch.long)
        return Case(lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=True).logits)

    def kv_bytes_read(self, context: int) -> int:
        return 2 * self.layers * self.kv_heads * context * self.head_dim * 4


def _initializer_bytes(root: Path, model, exclude=()) -> int:
    """Bytes of a graph's initializers (external ones from their `length` entry), skipping names with `exclude`."""
    total = 0
    for init in model.graph.initializer:
        if any(e in init.name for e in exclude):
            continue
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
        else:
            total += len(init.raw_data) or int(np.prod(init.dims)) * 4
    return total
