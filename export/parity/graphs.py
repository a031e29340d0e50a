"""Per-graph parity: each bundle graph on a runtime backend against the PyTorch reference, on the same inputs.

The reference side is HF's own modules (CLIPVisionModel with output_hidden_states, Phi3ForCausalLM with its
DynamicCache), never our export wrappers, so a mistake in a wrapper cannot hide on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from polygraphy.comparator import Comparator, RunResults
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.comparator.struct import IterationResult
from polygraphy.logger import G_LOGGER
from transformers import DynamicCache

from export.reference.model import HealthGPT
from runtime.contract.graphspec import GraphSpec, Tolerance
from runtime.contract.healthgpt import IMAGE_TOKENS, TASKS, VQ_CODES, graph_id
from runtime.contract.reports import GraphCheck
from runtime.core.clip_input import preprocess
from runtime.core.generate import decode_one_token, forward
from runtime.core.pipeline import Pipeline


def measure(graph: str, what: str, got, want, tolerance) -> GraphCheck:
    """Polygraphy's Comparator (elementwise max abs/rel error against the tolerance) plus cosine similarity."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        return GraphCheck(graph, f"{what}: shape {got.shape} != {want.shape}", np.inf, np.inf, -1.0,
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
    return GraphCheck(graph, what, float(out.max_absdiff), float(out.max_reldiff), cosine, tolerance.max_abs,
                 tolerance.min_cosine, bool(result) and cosine >= tolerance.min_cosine)


@dataclass
class GraphExpectations:
    """What the reference computed for one task, on the inputs the backends are then given: kept so the model can
    be freed before any backend session is created (verify never holds both: at full size each is ~15 GB)."""
    task: str
    pixel_values: np.ndarray
    image_embeds: np.ndarray
    input_ids: np.ndarray
    inputs_embeds: np.ndarray  # of the random ids
    prompt_embeds: np.ndarray  # the reference's own prompt, image spliced in
    logits: list[np.ndarray]  # prefill, then one per greedy decode step
    tokens: list[int]  # fed after each logits but the last: the reference's own argmax
    shared: dict[str, tuple[np.ndarray, np.ndarray]]  # vqgan: (indices, image)


@torch.no_grad()
def expect_graphs(ref: HealthGPT, vocab: int, image, steps: int = 8, seed: int = 0) -> GraphExpectations:
    """The reference's side of `graph_parity`: vision, embed, decoder (prefill + `steps` greedy steps), vqgan."""
    rng = np.random.default_rng(seed)
    pv = preprocess(image)
    image_embeds = ref.encode_image(torch.from_numpy(pv).to(ref.dtype))
    ids = rng.integers(0, vocab, size=(1, 17))
    embeds = ref.embed(ref.prompt_ids("What does this scan show?"), image_embeds)
    hf_cache = DynamicCache()
    out = ref.llm(inputs_embeds=embeds, past_key_values=hf_cache, use_cache=True)
    logits, tokens = [], []
    for step in range(steps + 1):
        logits.append(out.logits[0, -1].float().numpy())
        if step == steps:
            break
        tokens.append(int(logits[-1].argmax()))
        out = ref.llm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=hf_cache, use_cache=True)
    shared = {}
    for name in TASKS[ref.task].shared_graphs:  # the VQGAN
        indices = rng.integers(0, VQ_CODES, size=(1, IMAGE_TOKENS))
        shared[name] = (indices, ref.vqgan(torch.from_numpy(indices)).numpy())
    return GraphExpectations(ref.task, pv, image_embeds.float().numpy(), ids,
                             ref.llm.model.embed_tokens(torch.from_numpy(ids)).float().numpy(),
                             embeds.float().numpy(), logits, tokens, shared)


def graph_parity(want: GraphExpectations, pipe: Pipeline,
                 tolerance: Callable[[GraphSpec], Tolerance] = lambda spec: spec.tolerance) -> list[GraphCheck]:
    """Each graph of the task on the sessions `pipe` holds (the same ones the end-to-end checks use), fed the
    inputs the reference was fed."""
    task, checks = want.task, []
    graph = vars(pipe.task(task))  # vision, embed, decoder
    got = graph["vision"].run({"pixel_values": want.pixel_values})["image_embeds"]
    checks.append(measure(f"{task}.vision", "image_embeds", got, want.image_embeds, tolerance(graph["vision"].spec)))
    got = graph["embed"].run({"input_ids": want.input_ids})["inputs_embeds"]
    checks.append(measure(f"{task}.embed", "inputs_embeds", got, want.inputs_embeds, tolerance(graph["embed"].spec)))

    decoder, tol = graph["decoder"], tolerance(graph["decoder"].spec)
    cache = pipe.cache(task)
    logits = forward(decoder, cache, want.prompt_embeds.astype(decoder.spec.tensor("inputs_embeds").dtype))
    for step, expected in enumerate(want.logits):
        checks.append(measure(f"{task}.decoder", "prefill logits" if step == 0 else f"decode step {step} logits",
                              logits, expected, tol))
        if step < len(want.tokens):
            logits = decode_one_token(decoder, graph["embed"], cache, want.tokens[step])

    for name, (indices, image) in want.shared.items():
        vq = pipe.shared(name)
        checks.append(measure(graph_id(task, name), "image (uint8)", vq.run({"indices": indices})["image"], image,
                              tolerance(vq.spec)))
    return checks
