"""Self-attention over the paged KV cache, and the per-step metadata every layer shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from professional_nano_llm import ops
from professional_nano_llm.config import ModelConfig
from professional_nano_llm.engine.batch import Batch
from professional_nano_llm.layers.linear import Linear, MergedLinear
from professional_nano_llm.layers.norm import RMSNorm
from professional_nano_llm.layers.rotary import RotaryEmbedding


@dataclass(slots=True)
class AttentionMetadata:
    """One step's batch split for the kernels: one-token (decode) sequences first, then prefills."""

    slot_mapping: torch.Tensor  # [T]
    num_decode_tokens: int  # = decode sequences: the first tokens of the step
    decode_context_lens: torch.Tensor  # [Sd]
    decode_block_tables: torch.Tensor  # [Sd, max_blocks]
    prefill_cu_seqlens_q: torch.Tensor  # [Sp + 1], counted from the first prefill token
    prefill_context_lens: torch.Tensor  # [Sp]
    prefill_block_tables: torch.Tensor  # [Sp, max_blocks]

    @classmethod
    def from_batch(cls, batch: Batch) -> AttentionMetadata:
        nd = batch.num_decode_seqs
        return cls(
            batch.slot_mapping,
            nd,
            batch.context_lens[:nd],
            batch.block_tables[:nd],
            batch.cu_seqlens_q[nd:] - nd,
            batch.context_lens[nd:],
            batch.block_tables[nd:],
        )


class Attention(nn.Module):
    """Fused qkv projection, optional q/k RMSNorm (Qwen3), rotary, KV store, paged attention, o_proj."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, cfg.qkv_bias, dtype)
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.scale = cfg.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D], set by the runner

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T, H, Hkv, D = hidden.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)  # strided views, no copies
        q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
        if self.q_norm is not None:  # Qwen3: q/k norm, rotary and KV store in one kernel
            ops.qk_norm_rope_store(positions, q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                   self.rotary.cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping)
        else:
            self.rotary(positions, q, k)
            ops.store_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty(T, H, D, dtype=hidden.dtype, device=hidden.device)
        nd = meta.num_decode_tokens
        if nd > 0:
            ops.paged_attention_decode(out[:nd], q[:nd], self.k_cache, self.v_cache, meta.decode_context_lens,
                                       meta.decode_block_tables, self.scale)
        if nd < T:
            ops.paged_attention_prefill(out[nd:], q[nd:], self.k_cache, self.v_cache, meta.prefill_cu_seqlens_q,
                                        meta.prefill_context_lens, meta.prefill_block_tables, self.scale)
        return self.o_proj(out.view(T, H * D))
