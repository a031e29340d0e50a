"""Next-token choice from fp32 logits: greedy (the reference behaviour) or seeded temperature/top-k/top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy argmax (first index on ties, as torch.argmax)
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    allowed: tuple[int, int] | None = None  # [lo, hi) token range, e.g. the <idx_*> tokens

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:  # logits: [vocab]
        if self.allowed is not None:
            lo, hi = self.allowed
            masked = np.full_like(logits, -np.inf)
            masked[lo:hi] = logits[lo:hi]
            logits = masked
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1  # smallest prefix with mass >= top_p
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
