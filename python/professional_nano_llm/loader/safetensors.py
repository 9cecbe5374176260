"""Hugging Face folders: config.json plus one or more memory-mapped *.safetensors files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> Any:
    """The parsed JSON at `path`; ValueError naming the file when it is missing or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{path} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_config(folder: Path) -> PretrainedConfig:
    """The transformers config of a model folder."""
    read_json(folder / "config.json")  # AutoConfig's own errors do not say which file is broken
    return AutoConfig.from_pretrained(folder)


def safetensors_files(folder: Path) -> list[Path]:
    """The shards named by the index file when there is one, else every *.safetensors file."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        if missing := [str(f) for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    if files := sorted(folder.glob("*.safetensors")):
        return files
    raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (name, tensor, file name), reading one tensor at a time through a memory map."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path.name
        except SafetensorError as e:
            error = f"{path} is not a valid safetensors file (truncated or corrupt?): {e}"
            raise ValueError(error) from e
