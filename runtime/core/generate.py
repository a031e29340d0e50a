"""The decode loop, the same for every backend: prefill once, then one token at a time on the in-place KV cache."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime.contract.errors import UserError
from runtime.core.backend import Graph
from runtime.core.kvcache import KVCache
from runtime.core.sampling import Sampler


def forward(decoder: Graph, cache: KVCache, embeds: np.ndarray) -> np.ndarray:
    """One decoder run over S new positions (the prompt's: prefill; one token's: a decode step); their K/V rows are
    written into `cache` in place."""
    # embeds: [1, S, hidden] -> logits of the last position: [vocab]
    cache.check_room(embeds.shape[1])
    out = decoder.run({"inputs_embeds": embeds, **cache.feeds()})
    cache.update(out)
    return out["logits"][0]


def decode_one_token(decoder: Graph, embed: Graph, cache: KVCache, token: int) -> np.ndarray:
    x = embed.run({"input_ids": np.array([[token]], dtype=np.int64)})["inputs_embeds"]  # [1, 1, hidden]
    return forward(decoder, cache, x)


def generate(decoder: Graph, embed: Graph, cache: KVCache, prompt_embeds: np.ndarray, max_new_tokens: int,
             sample: Sampler, stop_ids: frozenset[int], on_token: Callable[[int], None] | None = None) -> list[int]:
    """New tokens only, the stop token excluded (HF generate's output minus its trailing eos). `cache`: empty."""
    logits = forward(decoder, cache, prompt_embeds)  # prefill
    tokens: list[int] = []
    while True:
        if not np.isfinite(logits).all():  # NaN weights or a failing backend: never an empty or garbage answer
            raise UserError(f"the decoder returned non-finite logits after {len(tokens)} tokens: the bundle's weights "
                            "or the backend are broken (run `build.py verify` on this bundle)")
        token = sample(logits)
        if token in stop_ids:
            return tokens
        tokens.append(token)
        if on_token:
            on_token(token)
        if len(tokens) >= max_new_tokens:
            return tokens
        logits = decode_one_token(decoder, embed, cache, token)


def check_budget(max_new_tokens) -> None:
    """A request's max_new_tokens: a positive int, or None for the task's default. 0 or less is refused (not taken
    as the default or as one token), as the CLI and the server refuse it."""
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                       or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1):
        raise UserError(f"max_new_tokens {max_new_tokens!r}: need a positive integer (None: the task's default)")
