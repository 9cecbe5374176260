"""Self-attention over the paged KV cache, and the per-step metadata every layer shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
    """The attention half of a decoder block (run by ops.decoder_layer): fused qkv projection with
    Qwen2's bias, Qwen3's q/k RMSNorm, rotary, and o_proj."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, cfg.qkv_bias, dtype)
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.scale = cfg.head_dim**-0.5
