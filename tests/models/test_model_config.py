"""Model configs: the RoPE frequencies against transformers' own, and the features we refuse clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from professional_nano_llm.layers.rotary import inv_frequencies
from professional_nano_llm.models import model_config

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)  # a short original context puts every band in play


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_inv_frequencies_match_transformers(theta):
    default = LlamaConfig(**SMALL, rope_theta=theta)
    want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(default)
    torch.testing.assert_close(inv_frequencies(model_config(default).rope, 32), want, rtol=0, atol=0)
    llama3 = LlamaConfig(**SMALL, rope_theta=theta, rope_scaling=LLAMA3)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](llama3, "cpu")
    got = inv_frequencies(model_config(llama3).rope, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert not torch.equal(got, inv_frequencies(model_config(default).rope, 32))  # the scaling did something


@pytest.mark.parametrize(
    "config, message",
    [
        (LlamaConfig(**SMALL, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
         "rope type 'yarn' is not supported; supported: default, llama3"),
        (LlamaConfig(**SMALL, rope_scaling=dict(rope_type="linear", factor=2.0)),
         "rope type 'linear' is not supported"),
        (LlamaConfig(**SMALL, attention_bias=True), r"attention_bias=True \(biases on q/k/v and o_proj\)"),
        (Qwen3Config(**SMALL, attention_bias=True), "Qwen3ForCausalLM with attention_bias=True"),
        (LlamaConfig(**SMALL, mlp_bias=True), "LlamaForCausalLM with mlp_bias=True is not supported"),
        (MistralConfig(**SMALL, sliding_window=32), "MistralForCausalLM with sliding-window attention"),
        (LlamaConfig(**{**SMALL, "num_key_value_heads": 3}), "num_attention_heads 4 is not a multiple of"),
        (LlamaConfig(**SMALL, head_dim=512), "head_dim 512 > 256 is not supported"),
    ],
    ids=["yarn", "linear", "llama-attention-bias", "qwen3-attention-bias", "mlp-bias", "sliding-window",
         "heads", "head-dim"],
)
def test_unsupported_features_are_refused(config, message):
    if not getattr(config, "architectures", None):
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    with pytest.raises(ValueError, match=message):
        model_config(config)


def test_supported_configs_pass():
    assert model_config(MistralConfig(**SMALL, sliding_window=None)).architecture == "MistralForCausalLM"
    qwen3 = Qwen3Config(**SMALL, sliding_window=32, use_sliding_window=False)  # a window it does not use
    qwen3.architectures = ["Qwen3ForCausalLM"]
    cfg = model_config(qwen3)
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim) == (True, False, qwen3.head_dim)
