"""Decoder variants exported only for the benchmark (export/ is not changed): each differs from the shipped graph in
exactly one respect, so the table can show that one choice before/after."""

from __future__ import annotations

import torch
from torch import nn

from export.compile.graphs import DecoderGraph
from export.reference.hlora import HLoraLinear, experts_out, spread


class FusedHLora(nn.Module):
    """H-LoRA with the base GEMM and the A/route GEMM fused: y_all = x [W; A*s; R]^T, split, gate, then B.
    (Shipped: FoldedHLora keeps W separate so its bytes are shared with the other task and the plain base.)"""

    def __init__(self, layer: HLoraLinear):
        super().__init__()
        self.out, self.rank, self.experts = layer.weight.shape[0], layer.rank, layer.experts
        a = layer.lora_A.weight * layer.scaling
        w = torch.cat([layer.weight, a, layer.lora_route.weight]).detach()
        self.w_a_route = nn.Parameter(w, requires_grad=False)
        self.lora_b_t = nn.Parameter(layer.lora_B.weight.detach().t(), requires_grad=False)
        self.register_buffer("spread", spread(self.rank, self.experts, layer.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w_a_route.t()
        base, a, route = y.split([self.out, self.rank, self.experts], dim=-1)
        return base + experts_out(a, route, self.lora_b_t, self.spread)


class AllPositionsDecoder(DecoderGraph):
    """The shipped decoder, but logits for every position [1, S, V] (what a plain HF-style export returns)."""

    def forward(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, *cache: torch.Tensor):
        h, new_rows = self.body(inputs_embeds, past_length, cache)
        return (self.logits(h), *new_rows)
