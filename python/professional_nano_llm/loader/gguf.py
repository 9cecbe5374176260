"""GGUF files (llama.cpp): metadata -> transformers config, tensors -> Hugging Face float32 tensors.

The header is parsed here, not with gguf.GGUFReader: the reader builds a numpy view per vocabulary
string, which takes 2.7 s for SmolLM2's 49k tokens (longer than dequantizing every tensor), and a
truncated file makes it fail without saying which tensor was lost. gguf.quants dequantizes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from transformers import AutoConfig, PretrainedConfig
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

# The types gguf.quants dequantizes that tests/loader/test_gguf.py checks against an independent
# implementation (transformers' torch dequantizer, or closeness after a quantize round trip).
SUPPORTED_TYPES = frozenset(GGMLQuantizationType[name] for name in [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
])  # fmt: skip
ARCHITECTURES = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# GGUF metadata value types: fixed-size scalars by struct format, then string and array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in a GGUF file."""

    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order: GGUF lists dimensions innermost first
    type: GGMLQuantizationType
    start: int  # byte offset in the file
    nbytes: int


class _Cursor:
    """Reads little-endian GGUF values front to back."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode()

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.take(_SCALARS[kind])[0]
        kind, count = self.take("IQ")
        if kind != _STRING:
            return list(self.take(f"{count}{_SCALARS[kind]}"))
        for _ in range(count):  # vocabulary, merges: the tokenizer reads them, a config their count
            (n,) = self.take("Q")
            self.pos += n
        return count


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Metadata and tensor table of a GGUF file, checked against the file's size; reads no tensor.
    As llama.cpp requires, the tensors' data must follow each other in table order, each padded to
    the alignment, so a corrupt offset cannot make one tensor read another's bytes.

    String arrays (the vocabulary, the merges) are given as their length.
    """
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        cursor = _Cursor(buf)
        magic, version, n_tensors, n_kv = cursor.take("4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"magic {magic!r}, version {version}; expected b'GGUF', 2 or 3")
        metadata = {cursor.string(): cursor.value(cursor.take("I")[0]) for _ in range(n_kv)}
        table = []
        for _ in range(n_tensors):
            name = cursor.string()
            (n_dims,) = cursor.take("I")
            dims = cursor.take(f"{n_dims}Q")
            table.append((name, tuple(reversed(dims)), *cursor.take("IQ")))
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is not a valid GGUF file (truncated or corrupt?): {e!r}") from e
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment must be a power of two, got {alignment!r} (corrupt?)")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors, expected_offset = [], 0
    for name, shape, type_id, offset in table:
        if type_id not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ValueError(f"{path}: tensor {name!r} has ggml type {_type_name(type_id)}, "
                             f"which cannot be dequantized (supported: {supported})")
        ggml_type = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if not shape or shape[-1] % block_size:
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} is not whole "
                             f"{ggml_type.name} blocks (corrupt?)")
        if offset != expected_offset:
            raise ValueError(f"{path}: tensor {name!r} has its data at offset {offset}, expected "
                             f"{expected_offset} (corrupt?)")
        start, nbytes = data_start + offset, math.prod(shape) // block_size * type_size  # Python ints: no overflow
        if start + nbytes > buf.size:
            raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {start + nbytes}, "
                             f"the file at {buf.size}")
        tensors.append(GGUFTensor(name, shape, ggml_type, start, nbytes))
        expected_offset += -(-nbytes // alignment) * alignment
    return metadata, tensors


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"{type_id} (unknown)"


def hf_name(path: Path, gguf_name: str) -> str:
    """A llama.cpp tensor name in Hugging Face's spelling.

    blk.0.attn_q.weight -> model.layers.0.self_attn.q_proj.weight; output.weight -> lm_head.weight.
    """
    base, _, suffix = gguf_name.rpartition(".")
    block, _, layer_part = base.partition(".")
    layer, _, part = layer_part.partition(".")
    if block == "blk" and layer.isdigit() and part in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"{path}: tensor {gguf_name!r} has no Hugging Face counterpart")


def gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config of a GGUF file, built from its metadata as transformers does."""
    metadata, tensors = read_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    names = {t.name for t in tensors}
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:  # llama.cpp keeps Llama 3.1's scaling there
        kind = repr(scaling) if scaling != "none" else "from rope_freqs.weight (Llama 3.1 style)"
        raise ValueError(f"{path}: RoPE scaling {kind} is not supported for GGUF files; "
                         "load the model's Hugging Face folder instead")
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: tensor 'token_embd.weight' (the token embedding) is missing")
    for t in tensors:
        hf_name(path, t.name)  # fail now rather than half way through loading the weights
    kwargs: dict[str, Any] = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        if hf_key := GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest):
            kwargs[hf_key] = value
    # beyond transformers' mapping: Qwen3's head_dim is not hidden_size // num_attention_heads
    if (head_dim := metadata.get(f"{arch}.attention.key_length")) is not None:
        kwargs["head_dim"] = head_dim
    shapes = {t.name: t.shape for t in tensors}
    kwargs.setdefault("vocab_size", shapes["token_embd.weight"][0])  # present: checked above
    kwargs["tie_word_embeddings"] = "output.weight" not in shapes  # llama.cpp drops a tied lm_head
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf reorders each llama head's q/k rows so that ggml's rope rotates adjacent
    # pairs (x0, x1), (x2, x3), ...; Hugging Face rotates halves (x_i, x_{i+d/2}), so undo it.
    return weight.reshape(n_head, -1, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf(path: Path, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (Hugging Face name, float32 tensor, file name), dequantizing one tensor at a time."""
    _, tensors = read_gguf(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    permuted = config.model_type == "llama"
    for t in tensors:
        raw = data[t.start : t.start + t.nbytes].reshape(quant_shape_to_byte_shape(t.shape, t.type))
        values = dequantize(raw, t.type)
        tensor = torch.from_numpy(values if values.flags.writeable else values.copy())  # F32: mmap
        name = hf_name(path, t.name)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute(tensor, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute(tensor, config.num_key_value_heads)
        yield name, tensor, path.name
