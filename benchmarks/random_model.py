"""A model folder with random weights from a config, for benchmarks and tests that need no download.

The weights come from transformers' own initialisation of the architecture, saved as safetensors;
the tokenizer is a word-level one ("t0", "t1", ...) over the config's vocabulary, enough for
token-id workloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast


def word_level_tokenizer(vocab_size: int, eos_token_id: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos_token_id}", unk_token="t0")


def random_model(config: dict | str | Path, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cpu", seed: int = 0) -> Path:
    """Writes config.json, random safetensors and a tokenizer into folder; returns it."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    folder = Path(folder)
    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    eos = config.get("eos_token_id") or 0
    word_level_tokenizer(config["vocab_size"], eos if isinstance(eos, int) else eos[0]).save_pretrained(folder)
    return folder
