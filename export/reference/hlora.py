"""HealthGPT's H-LoRA layer (reference: llava/peft/tuners/lora.py, class Linear) and its static, folded form.

Reference semantics, per token, 4 experts, r = total rank, each expert owning r/4 rows of A and columns of B:
    y = x W^T + ((x A^T * s) * repeat_interleave(softmax(x R^T), r/4)) B^T,   s = alpha / r * 4
Routing is a dense soft mixture per token, so it can never be merged into W.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class HLoraLinear(nn.Linear):
    """nn.Linear (the frozen base weight keeps its HF name) plus `lora_A`, `lora_B`, `lora_route` as in the release."""

    def __init__(self, base: nn.Linear, rank: int, alpha: int, experts: int = 4):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.experts, self.rank = experts, rank
        self.scaling = alpha / rank * experts
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        self.lora_route = nn.Linear(base.in_features, experts, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        gate = torch.softmax(self.lora_route(x), dim=-1).to(y.dtype)
        a = self.lora_A(x) * self.scaling
        return y + self.lora_B(torch.repeat_interleave(gate, self.rank // self.experts, dim=-1) * a)


def attach_hlora(llm: nn.Module, rank: int, alpha: int, experts: int = 4) -> None:
    """Replace the 4 fused linears of every decoder layer by HLoraLinear (what get_peft_model does)."""
    for layer in llm.model.layers:
        for path in ADAPTED:
            parent_name, child = path.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, HLoraLinear(getattr(parent, child), rank, alpha, experts))


class FoldedHLora(nn.Module):
    """The exported form: base GEMM kept separate so W stays shareable between tasks (same bytes on disk), A (with s
    folded in, exact since s is a power of two), the router R, the gate, then B. A and R are two MatMuls of their own
    (not one over [A; R] and a Split: as many nodes) so that A and B can be quantized while the router stays float.
    Every matrix is held as the [in, out] operand the graph's MatMul reads (W as a view: no copy), so each
    initializer of the exported graph is a parameter of this module, never a folded constant: the streaming export
    (export/compile/stream.py) fills them in layer by layer from the checkpoint."""

    def __init__(self, layer: HLoraLinear):
        super().__init__()
        self.rank, self.experts = layer.rank, layer.experts
        self.weight_t = _operand(layer.weight)  # [in, out], identical to the plain base model's W^T
        self.lora_a_t = _operand(layer.lora_A.weight * layer.scaling)
        self.route_t = _operand(layer.lora_route.weight)
        self.lora_b_t = _operand(layer.lora_B.weight)
        self.register_buffer("spread", spread(self.rank, self.experts, layer.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t + experts_out(x @ self.lora_a_t, x @ self.route_t, self.lora_b_t, self.spread)


def _operand(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w.detach().t(), requires_grad=False)


def spread(rank: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[experts, rank] 0/1: gate @ spread is repeat_interleave(gate, rank // experts) as one MatMul (exact), a
    constant of the graph rather than shape arithmetic."""
    return torch.eye(experts, dtype=dtype).repeat_interleave(rank // experts, dim=1)


def experts_out(a: torch.Tensor, route: torch.Tensor, lora_b_t: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """(x A^T s) [.., r] gated per expert by softmax(x R^T) [.., experts] (spread over each expert's r/experts
    columns by `spread`), then B (given as B^T [r, out]): the H-LoRA term of the output."""
    # fp32 island in fp16 graphs (softmax); never lower than the input's own precision
    gate = torch.softmax(route.to(torch.promote_types(a.dtype, torch.float32)), dim=-1).to(a.dtype)
    return (a * (gate @ spread)) @ lora_b_t
