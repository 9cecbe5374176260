"""Hugging Face architecture name -> the shared decoder with that architecture's features."""

from __future__ import annotations

import torch

from professional_nano_llm.config import ModelConfig
from professional_nano_llm.layers.rotary import inv_frequencies
from professional_nano_llm.models.decoder import CausalLM

# qkv_bias None: config.attention_bias must be off (it would bias o_proj as well).
_FEATURES = {
    "LlamaForCausalLM": dict(qkv_bias=None, qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=None, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=None, qk_norm=True),
}
SUPPORTED_ARCHITECTURES = tuple(_FEATURES)
# Configs built from GGUF metadata name only a model_type.
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def model_config(hf_config) -> ModelConfig:
    """Normalizes a transformers config; unsupported architectures or features raise ValueError."""
    architectures = getattr(hf_config, "architectures", None) or []
    arch = next((a for a in architectures if a in _FEATURES), None)
    if not architectures:
        arch = _BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise ValueError(
            f"unsupported architecture {architectures or hf_config.model_type!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if _uses_sliding_window(hf_config):
        raise ValueError(f"{arch} with sliding-window attention is not supported")
    features = _FEATURES[arch]
    qkv_bias = features["qkv_bias"]
    if qkv_bias is None and getattr(hf_config, "attention_bias", False):
        # transformers' Llama/Mistral/Qwen3 put this bias on o_proj too, which the decoder block lacks
        raise ValueError(f"{arch} with attention_bias=True (biases on q/k/v and o_proj) is not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError(f"{arch} with mlp_bias=True is not supported")
    num_heads = hf_config.num_attention_heads
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=bool(qkv_bias),
        qk_norm=features["qk_norm"],
        rope=_rope(hf_config),
    )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
    if cfg.head_dim > 256:
        raise ValueError(f"head_dim {cfg.head_dim} > 256 is not supported")
    inv_frequencies(cfg.rope, cfg.head_dim)  # rejects unknown rope types now, not at first use
    return cfg


def build_model(cfg: ModelConfig, max_position: int, dtype: torch.dtype, device: torch.device) -> CausalLM:
    with torch.device(device):
        return CausalLM(cfg, max_position, dtype).eval()


def _rope(hf_config) -> dict:
    # transformers >= 5 keeps everything in rope_parameters; older versions use rope_theta + rope_scaling.
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(hf_config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _uses_sliding_window(hf_config) -> bool:
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return False
    if hasattr(hf_config, "use_sliding_window"):  # Qwen2/Qwen3 carry a window they do not use
        return bool(hf_config.use_sliding_window)
    return window < hf_config.max_position_embeddings
