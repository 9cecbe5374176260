"""The decoder every supported architecture shares: pre-norm blocks of attention and a SwiGLU MLP.

Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are fused
(packed_modules_mapping says where each original tensor goes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from professional_nano_llm.config import ModelConfig
from professional_nano_llm.layers.activation import SiluAndMul
from professional_nano_llm.layers.attention import Attention, AttentionMetadata
from professional_nano_llm.layers.linear import Linear, MergedLinear, linear, prepack_weight
from professional_nano_llm.layers.norm import RMSNorm
from professional_nano_llm.layers.rotary import RotaryEmbedding


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": size, "up": size}, False, dtype)
        self.act = SiluAndMul()
        self.down_proj = Linear(size, cfg.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream lives in `residual`; each norm adds the previous block's output into it.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_position: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        weight = self.model.embed_tokens.weight if self.tied_lm_weight is None else self.tied_lm_weight
        return linear(hidden, weight).float()

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
