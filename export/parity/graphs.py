"""Per-graph parity: each bundle graph on a runtime backend against the PyTorch reference, on the same inputs.

The reference side is HF's own modules (CLIPVisionModel with output_hidden_states, Phi3ForCausalLM with its
DynamicCache), never our export wrappers, so a mistake in a wrapper cannot hide on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from polygraphy.comparator import Comparator, RunResults
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.comparator.struct import IterationResult
from polygraphy.logger import G_LOGGER
from transformers import DynamicCache

from export.reference.model import HealthGPT
from runtime.generate import decode_one_token, prefill
from runtime.graphspec import GraphSpec, Tolerance
from runtime.healthgpt import IMAGE_TOKENS, TASKS, VQ_CODES, graph_id
from runtime.image import preprocess
from runtime.pipeline import Pipeline


@dataclass
class Check:
    graph: str
    what: str
    max_abs: float
    max_rel: float
    cosine: float
    max_abs_limit: float
    min_cosine: float
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


def measure(graph: str, what: str, got, want, tolerance) -> Check:
    """Polygraphy's Comparator (elementwise max abs/rel error against the tolerance) plus cosine similarity."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        return Check(graph, f"{what}: shape {got.shape} != {want.shape}", np.inf, np.inf, -1.0,
                     tolerance.max_abs, tolerance.min_cosine, False)
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    runs = RunResults([(name, [IterationResult({what: x}, runner_name=name)])
                       for name, x in (("reference", want), ("backend", got))])
    result = Comparator.compare_accuracy(runs, compare_func=SimpleCompareFunc(
        atol=tolerance.max_abs, rtol=0.0, check_error_stat="max"))
    out = result.lst[0][("reference", "backend")][0][what]
    a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom else float(np.array_equal(a, b))
    return Check(graph, what, float(out.max_absdiff), float(out.max_reldiff), cosine, tolerance.max_abs,
                 tolerance.min_cosine, bool(result) and cosine >= tolerance.min_cosine)


@torch.no_grad()
def graph_parity(ref: HealthGPT, pipe: Pipeline, image, steps: int = 8, seed: int = 0,
                 tolerance: Callable[[GraphSpec], Tolerance] = lambda spec: spec.tolerance) -> list[Check]:
    """vision, embed, decoder (prefill + `steps` greedy decode steps) and the task's shared graphs (gen: vqgan), on
    the sessions `pipe` holds (the same ones the end-to-end checks use)."""
    task, checks, rng = ref.task, [], np.random.default_rng(seed)
    graph = vars(pipe.task(task))  # vision, embed, decoder

    pv = preprocess(image)
    want_img = ref.encode_image(torch.from_numpy(pv).to(ref.dtype))
    got_img = graph["vision"].run({"pixel_values": pv})["image_embeds"]
    checks.append(measure(f"{task}.vision", "image_embeds", got_img, want_img.float(), tolerance(graph["vision"].spec)))

    ids = rng.integers(0, pipe.bundle.manifest.config.vocab, size=(1, 17))
    want = ref.llm.model.embed_tokens(torch.from_numpy(ids)).float()
    got = graph["embed"].run({"input_ids": ids})["inputs_embeds"]
    checks.append(measure(f"{task}.embed", "inputs_embeds", got, want, tolerance(graph["embed"].spec)))

    # Decoder: the reference's own prompt (image spliced in), then greedy steps; both sides fed the same tokens.
    embeds = ref.embed(ref.prompt_ids("What does this scan show?"), want_img)
    cache, hf_cache = pipe.cache(task), DynamicCache()
    tol = tolerance(graph["decoder"].spec)
    out = ref.llm(inputs_embeds=embeds, past_key_values=hf_cache, use_cache=True)
    logits = prefill(graph["decoder"], cache, embeds.float().numpy().astype(graph["decoder"].spec.tensor(
        "inputs_embeds").dtype))
    for step in range(steps + 1):
        want = out.logits[0, -1].float()
        checks.append(measure(f"{task}.decoder", "prefill logits" if step == 0 else f"decode step {step} logits",
                              logits, want, tol))
        if step == steps:
            break
        token = int(want.argmax())
        out = ref.llm(input_ids=torch.tensor([[token]]), past_key_values=hf_cache, use_cache=True)
        logits = decode_one_token(graph["decoder"], graph["embed"], cache, token)

    for name in TASKS[task].shared_graphs:  # the VQGAN
        vq = pipe.shared(name)
        indices = rng.integers(0, VQ_CODES, size=(1, IMAGE_TOKENS))
        want = ref.vqgan(torch.from_numpy(indices)).numpy()
        got = vq.run({"indices": indices})["image"]
        checks.append(measure(graph_id(task, name), "image (uint8)", got, want, tolerance(vq.spec)))
    return checks
