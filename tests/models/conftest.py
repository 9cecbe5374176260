"""Models for end-to-end tests: the bundled SmolLM2 GGUF and tiny random Llama/Qwen2/Qwen3 folders."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from professional_nano_llm.loader import default_model_path

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,  # wider than the default 0.02, so greedy argmaxes are not near-ties
)
TINY_CONFIGS = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **TINY),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **TINY),
    "qwen3": lambda vocab: Qwen3Config(vocab_size=vocab, head_dim=64, tie_word_embeddings=True, **TINY),
    # Llama 3.1's RoPE scaling; an original context of 64 puts the prompts' positions in every band
    "llama3-rope": lambda vocab: LlamaConfig(
        vocab_size=vocab, tie_word_embeddings=False, **TINY,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
}


@pytest.fixture(scope="session")
def smollm_path():
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path):
    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    """transformers' own float32 model from the same GGUF file: the oracle."""
    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm_tokenizer):
    """{arch: (folder, transformers model)}: random weights saved as safetensors, SmolLM2's tokenizer."""
    models = {}
    for arch, make_config in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(len(smollm_tokenizer)), dtype=torch.float32).eval()
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder, safe_serialization=True)
        smollm_tokenizer.save_pretrained(folder)
        models[arch] = (folder, model)
    return models


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation that never stops at EOS."""
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def hf_last_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt_ids])).logits[0, -1].float()
