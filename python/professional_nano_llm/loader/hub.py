"""Downloading a model folder from the Hugging Face hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from professional_nano_llm.loader.safetensors import INDEX_FILE, read_json

# what download() fetches first: the config, the shard index, the tokenizer, the generation defaults
META_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(model: str) -> bool:
    """True for "org/name": one slash, no leading "." or "/", no ".." (those are paths)."""
    return _HUB_ID.fullmatch(model) is not None and ".." not in model


def download(repo_id: str) -> Path:
    """The local snapshot of a hub repository: its config and tokenizer files, then only the weights
    the loader reads (the index's shards: Mistral's repos also hold the whole model again as
    consolidated.safetensors)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=META_PATTERNS, local_files_only=offline))
        if not (folder / "config.json").exists():
            raise ValueError(f"the hub repository {repo_id!r} has no config.json, so it is no Hugging Face model "
                             "folder; if it holds .gguf files, download one (`hf download "
                             f"{repo_id} FILE.gguf`) and pass its path")
        weights = ["*.safetensors"]
        if (folder / INDEX_FILE).exists():
            weight_map = read_json(folder / INDEX_FILE).get("weight_map")
            if isinstance(weight_map, dict):  # else the loader names the broken index
                weights = sorted(set(weight_map.values()))
        snapshot_download(repo_id, allow_patterns=weights, local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        # both mean: no network (or HF_HUB_OFFLINE) and no cached copy
        raise ConnectionError(
            f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no connection'}) and the model is not in "
            "the local cache; pass a local path instead (a folder with config.json and "
            "*.safetensors, or a .gguf file)"
        ) from e
    return folder
