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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
    """inputs_embeds [1,S,H], past_length [1], cache [1,kvh,C,d] x 2L -> logits [1,V], new rows [1,kvh,S,d] x 2L.
    C (the cache buffer's rows, <= max_context) is dynamic; positions up to max_context have RoPE tables.
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
        self.blocks = nn.ModuleList(Block(layer, fold) for layer in llm.model.layers)
        self.norm = llm.model.norm
        # the LM head as its MatMul operand [H, V] in fp32 (an fp32 island), a parameter for the streaming export
        self.lm_head_t = nn.Parameter(llm.lm_head.weight.detach().float().t(), requires_grad=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float()
                                             / self.head_dim))
        freqs = torch.arange(max_context).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.norm.weight.dtype
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def masks(self, past_length: torch.Tensor, seq: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive fp32 masks: [S, C] over the cache (rows >= past_length are stale), [S, S] over the new keys."""
        q = past_length + torch.arange(seq)  # absolute positions of the new tokens
        k_cache = torch.arange(rows)
        k_new = q
        ok_cache = k_cache[None, :] < past_length
        ok_new = k_new[None, :] <= q[:, None]
        if self.window is not None:
            ok_cache = ok_cache & (k_cache[None, :] > q[:, None] - self.window)
            ok_new = ok_new & (k_new[None, :] > q[:, None] - self.window)
        neg = torch.tensor(float("-inf"))
        return torch.where(ok_cache, 0.0, neg), torch.where(ok_new, 0.0, neg)

    def attention(self, block, x, cos, sin, k_cache, v_cache, mask_cache, mask_new):
        seq, d, g = x.shape[1], self.head_dim, self.heads // self.kv_heads
        qkv = block.qkv(x)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(1, seq, self.heads, d).transpose(1, 2)
        k = k.view(1, seq, self.kv_heads, d).transpose(1, 2)
        v = v.view(1, seq, self.kv_heads, d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # GQA without repeating the cache: fold each KV head's query group into the row axis.
        qg = q.reshape(1, self.kv_heads, g * seq, d)
        scale = d ** -0.5
        s_cache = (qg @ k_cache.transpose(2, 3) * scale).view(1, self.heads, seq, -1) + mask_cache
        s_new = (qg @ k.transpose(2, 3) * scale).view(1, self.heads, seq, seq) + mask_new
        p = torch.softmax(torch.cat([s_cache, s_new], dim=-1).float(), dim=-1).to(x.dtype)
        rows = k_cache.shape[2]
        p_cache, p_new = p[..., :rows], p[..., rows:]
        out = (p_cache.reshape(1, self.kv_heads, g * seq, -1) @ v_cache
               + p_new.reshape(1, self.kv_heads, g * seq, seq) @ v)
        out = out.view(1, self.heads, seq, d).transpose(1, 2).reshape(1, seq, self.heads * d)
        return block.o(out), k, v

    def body(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, cache) -> tuple[torch.Tensor, list]:
        """All layers: final hidden states [1, S, H] and the new K/V rows of every layer."""
        seq = inputs_embeds.shape[1]
        positions = past_length + torch.arange(seq)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        mask_cache, mask_new = self.masks(past_length, seq, cache[0].shape[2])
        h, new_rows = inputs_embeds, []
        for i, block in enumerate(self.blocks):
            a, k, v = self.attention(block, rms_norm(block.input_norm, h), cos, sin,
                                     cache[2 * i], cache[2 * i + 1], mask_cache, mask_new)
            h = h + a
            gate, up = block.gate_up(rms_norm(block.post_norm, h)).chunk(2, dim=-1)
            h = h + block.down(up * nn.functional.silu(gate))
            new_rows += [k, v]
        return h, new_rows

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.norm, h).float() @ self.lm_head_t

    def forward(self, inputs_embeds: torch.Tensor, past_length: torch.Tensor, *cache: torch.Tensor):
        h, new_rows = self.body(inputs_embeds, past_length, cache)
        return (self.logits(h[:, -1]), *new_rows)  # last position only
