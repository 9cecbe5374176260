"""Safetensors folders: lazily yielded tensors equal the saved state dict, sharded or not."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from professional_nano_llm.loader import resolve_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)).to(torch.bfloat16),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """(the tensors a checkpoint must hold, a folder with single/ and sharded/ copies of it)."""
    torch.manual_seed(0)
    model = MODELS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder / "single")
    model.save_pretrained(folder / "sharded", max_shard_size="40KB")
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # saved once, under the embedding's name
        del state["lm_head.weight"]
    return state, folder


def load(folder: Path) -> dict[str, tuple[torch.Tensor, str]]:
    out = {}
    for name, tensor, file in resolve_model(folder).tensors():
        assert name not in out, f"{name} yielded twice"
        out[name] = tensor, file
    return out


def copy_of(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_tensors_equal_state_dict(saved):
    state, folder = saved
    source = resolve_model(folder / "single")
    assert (source.path, source.format) == (folder / "single", "safetensors")
    config = json.loads((folder / "single/config.json").read_text())
    assert source.hf_config.model_type == config["model_type"]
    loaded = load(folder / "single")
    assert loaded.keys() == state.keys()
    for name, (tensor, file) in loaded.items():
        assert file == "model.safetensors"
        assert tensor.dtype == state[name].dtype, name
        assert torch.equal(tensor, state[name]), name


def test_sharded_equals_unsharded(saved):
    state, folder = saved
    weight_map = json.loads((folder / "sharded/model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    loaded = load(folder / "sharded")
    assert loaded.keys() == state.keys() == weight_map.keys()
    for name, (tensor, file) in loaded.items():
        assert file == weight_map[name], name
        assert torch.equal(tensor, state[name]), name


def test_yields_lazily_one_shard_at_a_time(saved, tmp_path):
    """A broken last shard is only noticed after the earlier shards' tensors have been yielded."""
    _, folder = saved
    copy = copy_of(folder / "sharded", tmp_path / "m")
    last = sorted(copy.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-7])
    it = resolve_model(copy).tensors()
    assert isinstance(it, Iterator)
    seen = set()
    with pytest.raises(ValueError, match=re.escape(last.name)) as e:
        for _, _, file in it:
            seen.add(file)
    assert "truncated or corrupt" in str(e.value) and str(last) in str(e.value)
    assert seen == {f.name for f in sorted(copy.glob("*.safetensors"))[:-1]}


@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_file_is_a_value_error_naming_it(saved, tmp_path, where):
    _, folder = saved
    path = copy_of(folder / "single", tmp_path / "m") / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7 if where == "data" else 7])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        list(resolve_model(path.parent).tensors())
    assert str(path) in str(e.value)


def test_missing_shard_names_it(saved, tmp_path):
    _, folder = saved
    copy = copy_of(folder / "sharded", tmp_path / "m")
    missing = sorted(copy.glob("*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="do not exist") as e:
        resolve_model(copy)
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_the_file(saved, tmp_path, broken):
    _, folder = saved
    copy = copy_of(folder / "sharded", tmp_path / "m")
    (copy / broken).write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        resolve_model(copy)
    assert str(copy / broken) in str(e.value)


def test_missing_config_names_it(saved, tmp_path):
    _, folder = saved
    copy = copy_of(folder / "single", tmp_path / "m")
    (copy / "config.json").unlink()
    with pytest.raises(ValueError, match="missing") as e:
        resolve_model(copy)
    assert str(copy / "config.json") in str(e.value)
