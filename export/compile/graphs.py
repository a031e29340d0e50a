"""Export-friendly torch modules, one per graph in export/compile/specs.py, built from the loaded reference.

The decoder is our own Phi-3 forward (not HF's) so that it can read the runtime's in-place KV cache buffer and emit
only the new rows; its numerics follow HF's eager Phi-3 (fp32 RMSNorm and softmax, rotate_half RoPE, fp32 inv_freq).
"""

from __future__ import annotations

import torch
from torch import nn

from export.reference.hlora import FoldedHLora, HLoraLinear
from export.reference.model import HealthGPT
from runtime.contract.errors import UserError


class VisionGraph(nn.Module):
    """CLIP embeddings + pre-LN + the blocks the task reads (the rest pruned), CLS dropped, projector."""

    def __init__(self, ref: HealthGPT):
        super().__init__()
        vm = ref.clip.vision_model
        self.embeddings, self.pre_layrnorm = vm.embeddings, vm.pre_layrnorm
        self.blocks = vm.encoder.layers[: ref.cfg.clip_blocks(len(vm.encoder.layers))]
        self.projector = ref.projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(pixel_values.to(self.projector[0].weight.dtype)))
        for block in self.blocks:
            h = block(h, None, None)[0]
        return self.projector(h[:, 1:])  # [1, 576, hidden]


class EmbedGraph(nn.Module):
    def __init__(self, ref: HealthGPT):
        super().__init__()
        self.table = ref.llm.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF Phi3RMSNorm: statistics in fp32, weight applied after casting back."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class SplitLast(torch.autograd.Function):
    """x [..., A + B] -> x[..., :A], x[..., A:] as one ONNX Split whose sizes [A, B] are a tensor made once per step
    (the tracer would write two Slices, with their bounds, per layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.clone() for t in x.split(sizes.tolist(), dim=-1))

    @staticmethod
    def symbolic(g, x, sizes):
        return g.op("Split", x, sizes, axis_i=-1, outputs=2)


class Block(nn.Module):
    """One Phi-3 layer's weights, shared with the reference (not copied); H-LoRA linears folded for export."""

    def __init__(self, layer: nn.Module, fold: type[nn.Module]):
        super().__init__()

        def folded(m):
            return fold(m) if isinstance(m, HLoraLinear) else m

        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv, self.o = folded(layer.self_attn.qkv_proj), folded(layer.self_attn.o_proj)
        self.gate_up, self.down = folded(layer.mlp.gate_up_proj), folded(layer.mlp.down_proj)


class DecoderGraph(nn.Module):
    """inputs_embeds [1,S,H], past_length [1], cache [C,kvh,d] x 2L -> logits [1,V], new rows [S,kvh,d] x 2L.
    The cache rows are outermost, so the runtime binds the first max(past_length, 1) rows of its buffer as one
    contiguous view; C (<= max_context) is dynamic; positions up to max_context have RoPE tables.
    Written for a lean trace: head counts and head_dim as constants (no Shape arithmetic per layer), attention on
    [S, heads, d] and [heads, S, d] views, and the rotation, the mask and the split sizes built once per step from
    past_length, S and C and shared by every layer (ONNX Runtime's CSE merges what the tracer repeats).
    fold: what each H-LoRA linear becomes in the graph (FoldedHLora: W kept apart, shareable; benchmarks try others)."""

    def __init__(self, llm: nn.Module, max_context: int, fold: type[nn.Module] = FoldedHLora):
        super().__init__()
        cfg = llm.config
        if cfg.rope_scaling or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            # Phi-3-mini-4k and phi-4 use plain RoPE; a 128k/longrope base would need its scaling reproduced.
            raise UserError(f"unsupported RoPE configuration (rope_scaling={cfg.rope_scaling}, partial_rotary_factor="
                            f"{getattr(cfg, 'partial_rotary_factor', 1.0)}): only plain RoPE bases are supported")
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.window = cfg.sliding_window  # HF 4.57: key j is seen by query i iff i - window < j <= i
        self.max_context = max_context
        self.intermediate = cfg.intermediate_size  # a constant split (chunk would compute it per layer)
        self.blocks = nn.ModuleList(Block(layer, fold) for layer in llm.model.layers)
        self.norm = llm.model.norm
        # the LM head as its MatMul operand [H, V] in fp32 (an fp32 island), a parameter for the streaming export
        self.lm_head_t = nn.Parameter(llm.lm_head.weight.detach().float().t(), requires_grad=False)
        d = self.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.arange(max_context).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.norm.weight.dtype
        # rotate_half(x) = x[(i + d/2) mod d] * (-1 for i < d/2): the sign goes into the sin table, the permutation
        # into a 0/1 matrix, so RoPE is x @ (diag(cos) + P diag(sin)): one MatMul per layer, exact up to rounding
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * sign).to(dtype), persistent=False)
        self.register_buffer("eye", torch.eye(d, dtype=dtype), persistent=False)
        self.register_buffer("half_turn", torch.eye(d, dtype=dtype).roll(d // 2, dims=0), persistent=False)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """[S, d, d]: per position the matrix that applies HF's rotate_half RoPE to a row vector of one head."""
        return self.eye * self.cos[positions][:, None, :] + self.half_turn * self.sin[positions][:, None, :]

    def mask(self, past_length: torch.Tensor, seq: int, rows: int) -> torch.Tensor:
        """Additive fp32 mask [g*S, C+S] over the cache rows (rows >= past_length are stale) then the new keys;
        query rows ordered (group member, position) as attention() lays them out."""
        q = past_length + torch.arange(seq)  # absolute positions of the new tokens
        k_cache = torch.arange(rows)
        ok = torch.cat([(k_cache[None, :] < past_length).expand(seq, rows), q[None, :] <= q[:, None]], dim=-1)
        if self.window is not None:
            ok = ok & (torch.cat([k_cache, q])[None, :] > q[:, None] - self.window)
        mask = torch.where(ok, 0.0, torch.tensor(float("-inf")))
        groups = self.heads // self.kv_heads
        return mask.repeat(groups, 1) if groups > 1 else mask

    def attention(self, block, x, rot, k_cache, v_cache, mask, split):
        """x [1, S, H] -> output [1, S, H] and the new rows [S, kvh, d]; GQA folds each KV head's query group into the
        row axis and reads the cache [C, kvh, d] as transposed operands (ONNX Runtime: strides, no copy)."""
        heads, kv_heads, d = self.heads, self.kv_heads, self.head_dim
        q, k, v = block.qkv(x).view(-1, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
        rot_k, rot_q = rot  # q's rotation carries the scores' 1/sqrt(d) (see body)
        q, k = q @ rot_q, k @ rot_k
        q = q.transpose(0, 1)  # [heads, S, d]
        if heads != kv_heads:
            q = q.reshape(kv_heads, -1, d)
        scores = torch.cat([q @ k_cache.permute(1, 2, 0), q @ k.permute(1, 2, 0)], dim=-1)
        p_cache, p_new = SplitLast.apply(torch.softmax(scores.float() + mask, dim=-1).to(x.dtype), split)
        out = p_cache @ v_cache.transpose(0, 1) + p_new @ v.transpose(0, 1)  # [kvh, g*S, d]
        if heads != kv_heads:
            out = out.reshape(heads, -1, d)
        return block.o(out.transpose(0, 1).reshape(1, -1, heads * d)), k, v

    def body(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, cache) -> tuple[torch.Tensor, list]:
        """All layers: final hidden states [1, S, H] and the new K/V rows of every layer. (Activations keep their
        batch axis: traced 2-D against the streaming export's placeholder weights, the export held ~10 MB more per
        layer; tests/test_streaming.py.)"""
        seq, rows = inputs_embeds.shape[1], cache[0].shape[0]
        # [C, S] as a tensor traced from the inputs' shapes (a Python list would be baked in as constants)
        split = torch.cat([torch._shape_as_tensor(cache[0])[:1], torch._shape_as_tensor(inputs_embeds)[1:2]])
        rot = self.rotation(past_length + torch.arange(seq))
        # the scores' scale goes into q's rotation, once a step: on the scores, ONNX Runtime fuses it into the MatMul
        # over the cached keys (alpha != 1), which keeps MLAS off its M=1 kernel and packs those keys every step
        # (benchmarks/README.md, "Decode attention"; tests/test_lean_decoder.py)
        rot = (rot, rot * self.head_dim ** -0.5)
        mask = self.mask(past_length, seq, rows)
        h, new_rows = inputs_embeds, []
        for i, block in enumerate(self.blocks):
            a, k, v = self.attention(block, rms_norm(block.input_norm, h), rot, cache[2 * i], cache[2 * i + 1],
                                     mask, split)
            h = h + a
            gate, up = block.gate_up(rms_norm(block.post_norm, h)).split(self.intermediate, dim=-1)
            h = h + block.down(up * nn.functional.silu(gate))
            new_rows += [k, v]
        return h, new_rows

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.norm, h).float() @ self.lm_head_t

    def forward(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, *cache: torch.Tensor):
        h, new_rows = self.body(inputs_embeds, past_length, cache)
        return (self.logits(h[:, -1]), *new_rows)  # last position only: [1, V]
