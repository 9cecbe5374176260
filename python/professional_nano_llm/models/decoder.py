"""The decoder every supported architecture shares: pre-norm blocks of attention and a SwiGLU MLP.

Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are fused
(packed_modules_mapping says where each original tensor goes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from professional_nano_llm import ops
from professional_nano_llm.config import ModelConfig
from professional_nano_llm.layers.attention import Attention, AttentionMetadata
from professional_nano_llm.layers.linear import Linear, MergedLinear, linear, prepack_weight
from professional_nano_llm.layers.norm import RMSNorm
from professional_nano_llm.layers.rotary import RotaryEmbedding


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": size, "up": size}, False, dtype)
        self.down_proj = Linear(size, cfg.hidden_size, False, dtype)


class DecoderLayer(nn.Module):
    """Pre-norm attention and SwiGLU MLP; the block runs as one op (ops.decoder_layer)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)
        self.operands: tuple | None = None  # the op's weights and caches, fixed by bind_kv_cache

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Gives the block its caches [num_blocks, block_size, Hkv, D] and fixes the op's operands
        once, after loading and prepacking: gathering them every step cost ~4% of a decode step."""
        attn, mlp = self.self_attn, self.mlp
        q_norm, k_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else (None, None)
        self.operands = (
            self.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, q_norm, k_norm,
            attn.o_proj.weight, self.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight,
            attn.rotary.cos_sin_cache, k_cache, v_cache,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """hidden [T, hidden_size]: the previous block's output. The residual stream lives in
        `residual` (updated in place); returns this block's output."""
        if self.operands is None:
            raise RuntimeError("a decoder layer runs once bind_kv_cache has given it its KV cache")
        return ops.decoder_layer(
            hidden, residual, positions, *self.operands, meta.slot_mapping, meta.num_decode_tokens,
            meta.decode_context_lens, meta.decode_block_tables, meta.prefill_cu_seqlens_q, meta.prefill_context_lens,
            meta.prefill_block_tables, self.input_layernorm.eps, self.self_attn.scale,
        )


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # The first block adds the embedding into a zero residual: 0 + x is exact, so it norms x itself.
        hidden = self.embed_tokens(input_ids)
        residual = torch.zeros_like(hidden)
        for layer in self.layers:
            hidden = layer(positions, hidden, residual, meta)
        self.norm.add_and_norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ModelConfig, max_position: int, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, max_position, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.tied_lm_weight: torch.Tensor | None = None  # a prepacked copy of the embedding, once prepacked

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab], model dtype
        # Not widened to float32: the sampler reads the logits once in their own dtype and widens
        # only what its slower paths (penalties, filters, logprobs) need.
        if self.lm_head is not None:
            return self.lm_head(hidden)
        weight = self.model.embed_tokens.weight if self.tied_lm_weight is None else self.tied_lm_weight
        return linear(hidden, weight)

    @torch.inference_mode()
    def prepack(self) -> None:
        """After loading: puts every matmul weight into its device's fastest layout. The embedding
        lookup needs the plain table, so a tied vocabulary projection gets its own packed copy."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        if self.lm_head is None:
            packed = prepack_weight(self.model.embed_tokens.weight)
            self.tied_lm_weight = packed if packed is not self.model.embed_tokens.weight else None

    @torch.inference_mode()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor, str]]) -> None:
        """Copies (Hugging Face name, tensor, source file) triples into the (fused) parameters.

        A tensor the model has no place for, a shape mismatch, or a parameter left unset raises
        ValueError naming the tensor and its file.
        """
        params = dict(self.named_parameters())
        expected = {(name, None) for name in params}
        for name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                for param in ("weight", "bias") if module.bias is not None else ("weight",):
                    expected.discard((f"{name}.{param}", None))
                    expected |= {(f"{name}.{param}", shard) for shard in module.shards}
        loaded: set[tuple[str, str | None]] = set()
        for name, tensor, source in tensors:
            if name.endswith("rotary_emb.inv_freq") or (self.lm_head is None and name == "lm_head.weight"):
                continue  # recomputed / tied to the embedding
            target, shard = _fused_name(name, self.packed_modules_mapping)
            param = params.get(target)
            if param is None:
                raise ValueError(f"{source}: tensor {name!r} has no place in {self.config.architecture}")
            rows = self.get_submodule(target.rsplit(".", 1)[0]).shards[shard] if shard else slice(None)
            dest = param.data[rows]
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add((target, shard))
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:8])}")


def _fused_name(name: str, mapping: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    for original, (fused, shard) in mapping.items():
        if f".{original}." in name:
            return name.replace(f".{original}.", f".{fused}."), shard
    return name, None
