"""Downloading a model folder from the Hugging Face hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

# what download() fetches: enough to build the model, its tokenizer and its generation defaults
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(model: str) -> bool:
    """True for "org/name": one slash, no leading "." or "/", no ".." (those are paths)."""
    return _HUB_ID.fullmatch(model) is not None and ".." not in model


def download(repo_id: str) -> Path:
    """The local snapshot of a hub repository (config, tokenizer and safetensors files only)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        # both mean: no network (or HF_HUB_OFFLINE) and no cached copy
        raise ConnectionError(
            f"cannot fetch {repo_id!r}: the Hugging Face hub is unreachable "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no connection'}) and the model is not in "
            "the local cache; pass a local path instead (a folder with config.json and "
            "*.safetensors, or a .gguf file)"
        ) from e
    return Path(folder)
