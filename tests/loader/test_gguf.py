"""GGUF files: written here with gguf.GGUFWriter as llama.cpp's converter would, and the bundled SmolLM2
file checked against transformers' own GGUF loading."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.gguf.dequant import dequantize as torch_dequantize
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from professional_nano_llm.loader import resolve_model
from professional_nano_llm.loader.gguf import SUPPORTED_TYPES, read_gguf

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-6)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32)),
}
# the type each weight is written in; 1-D tensors (norms, biases) stay F32
MODEL_TYPES = {"embed_tokens": T.Q8_0, "q_proj": T.Q4_0, "k_proj": T.Q8_0, "v_proj": T.F16,
               "o_proj": T.BF16, "gate_proj": T.Q4_1, "up_proj": T.Q5_0, "down_proj": T.Q5_1,
               "lm_head": T.F32}
# how far a round trip may move a weight, as a fraction of the tensor's largest magnitude
ROUND_TRIP_TOL = {T.F32: 0, T.F16: 1e-3, T.BF16: 4e-3, T.Q8_0: 1e-2, T.Q5_0: 7e-2, T.Q5_1: 7e-2,
                  T.Q4_0: 0.15, T.Q4_1: 0.15}
# the types with no quantizer in gguf.quants: random blocks, valid f16 scales at these byte offsets
BLOCK_TYPES = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q8_0: (0,), T.Q2_K: (80, 82), T.Q3_K: (108,),
               T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ1_S: (0,), T.IQ1_M: (),
               T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,),
               T.IQ4_NL: (0,), T.IQ4_XS: (0,)}


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: q/k rows reordered for ggml's interleaved rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, config: PretrainedConfig, tensors: dict[str, tuple[np.ndarray, T]],
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file holding HF-named `tensors` (array, type) under llama.cpp's names and layout."""
    arch = config.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_key_length(head_dim(config))
    w.add_value_length(head_dim(config))
    w.add_vocab_size(config.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim(config))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for hf_name, (array, ggml_type) in tensors.items():
        base, suffix = hf_name.rsplit(".", 1)
        if arch == "llama" and base.endswith("q_proj"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        raw_dtype = None if ggml_type in (T.F32, T.F16) else ggml_type
        w.add_tensor(f"{names.get_name(base)}.{suffix}", quantize(array, ggml_type), raw_dtype=raw_dtype)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_raw_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, T | None]],
                   metadata: dict[str, str | int] | None = None) -> Path:
    """A GGUF file of llama.cpp-named (array, raw type) tensors, and no metadata but the architecture
    and `metadata` (strings, and integers as uint32)."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_tensors(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, T]]:
    return {name: (t.float().numpy(), T.F32 if t.dim() == 1 else MODEL_TYPES[name.split(".")[-2]])
            for name, t in state.items()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request, tmp_path_factory) -> tuple[PretrainedConfig, dict[str, tuple[np.ndarray, T]], Path]:
    torch.manual_seed(0)
    model = MODELS[request.param]()
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    tensors = model_tensors(state)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", model.config, tensors)
    return model.config, tensors, path


def test_tensors_are_the_dequantized_hf_tensors(tiny):
    """Permuting rows commutes with row-wise blocks: the loader must give dequant(quant(w)) exactly."""
    _, tensors, path = tiny
    source = resolve_model(path)
    assert (source.path, source.format) == (path, "gguf")
    loaded = {name: (t, file) for name, t, file in source.tensors()}
    assert loaded.keys() == tensors.keys()
    for name, (t, file) in loaded.items():
        array, ggml_type = tensors[name]
        expected = dequantize(quantize(array, ggml_type), ggml_type)
        assert file == path.name
        assert t.dtype == torch.float32 and tuple(t.shape) == array.shape, name
        assert torch.equal(t, torch.from_numpy(expected)), name
        tol = ROUND_TRIP_TOL[ggml_type] * np.abs(array).max()
        assert np.abs(t.numpy() - array).max() <= tol, (name, ggml_type.name)


def test_config_from_metadata(tiny):
    config, _, path = tiny
    got = resolve_model(path).hf_config
    assert type(got) is type(config)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings"):
        assert getattr(got, key) == getattr(config, key), key
    assert head_dim(got) == head_dim(config)
    assert got.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    assert got.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)  # stored as f32


@pytest.mark.parametrize("ggml_type", sorted(BLOCK_TYPES), ids=lambda t: t.name)
def test_block_types_match_an_independent_dequantizer(tmp_path, ggml_type):
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rows, blocks_per_row = 3, 512 // block_size
    rng = np.random.default_rng(int(ggml_type))
    raw = rng.integers(0, 256, (rows, blocks_per_row, type_size), dtype=np.uint8)
    for offset in BLOCK_TYPES[ggml_type]:  # random bytes there could be inf or nan
        scales = rng.uniform(-1, 1, (rows, blocks_per_row, 1)).astype(np.float16)
        raw[..., offset : offset + 2] = scales.view(np.uint8)
    if ggml_type == T.IQ1_M:  # its f16 scale is spread over the high nibbles of bytes 49, 51, 53, 55
        raw[..., 55] &= 0xBF
    raw = raw.reshape(rows, -1)
    path = write_raw_gguf(tmp_path / f"{ggml_type.name}.gguf", "llama", {
        "token_embd.weight": (np.zeros((512, 64), np.float32), None),
        "output.weight": (raw, ggml_type),
    })
    loaded = dict((name, t) for name, t, _ in resolve_model(path).tensors())
    expected = torch_dequantize(torch.from_numpy(raw).reshape(-1), int(ggml_type)).reshape(rows, 512)
    assert torch.isfinite(expected).all()
    assert torch.equal(loaded["lm_head.weight"], expected)


def test_every_supported_type_is_tested():
    assert SUPPORTED_TYPES == set(MODEL_TYPES.values()) | set(BLOCK_TYPES)


def test_unsupported_type_names_file_and_tensor(tmp_path):
    path = write_raw_gguf(tmp_path / "tq.gguf", "llama", {
        "token_embd.weight": (np.zeros((512, 64), np.float32), None),
        "blk.0.ffn_down.weight": (np.zeros((4, GGML_QUANT_SIZES[T.TQ1_0][1]), np.uint8), T.TQ1_0),
    })
    with pytest.raises(ValueError, match=re.escape("'blk.0.ffn_down.weight' has ggml type TQ1_0")) as e:
        resolve_model(path)
    assert str(path) in str(e.value)


def test_truncated_file_names_file_and_tensor(tiny, tmp_path):
    _, _, path = tiny
    _, table = read_gguf(path)
    last = max(table, key=lambda t: t.start)
    cut = tmp_path / path.name
    cut.write_bytes(path.read_bytes()[: last.start + last.nbytes - 1])
    with pytest.raises(ValueError, match="truncated") as e:
        resolve_model(cut)
    assert str(cut) in str(e.value) and repr(last.name) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a gguf file at all, just text"])
def test_corrupt_header_names_file(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid GGUF file") as e:
        resolve_model(path)
    assert str(path) in str(e.value)


def test_header_cut_anywhere_is_a_value_error(tiny, tmp_path):
    _, _, path = tiny
    data = path.read_bytes()
    cut = tmp_path / path.name
    for size in range(4, 1200, 37):
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match=re.escape(str(cut))):
            resolve_model(cut)


def patch_tensor_info(data: bytes, name: str, dims: tuple[int, ...] | None = None,
                      offset: int | None = None) -> bytes:
    """The file with tensor `name`'s dimensions (innermost first, as stored) or data offset replaced
    in its header entry: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)."""
    key = name.encode()
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    out = bytearray(data)
    if dims is not None:
        assert len(dims) == n_dims
        struct.pack_into(f"<{n_dims}Q", out, at + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", out, at + 4 + 8 * n_dims + 4, offset)
    return bytes(out)


TWO_TENSORS = {"token_embd.weight": (np.ones((512, 64), np.float32), None),
               "output_norm.weight": (np.full(64, 2.0, np.float32), None)}


def test_corrupt_tensor_offset_or_shape_names_file_and_tensor(tmp_path):
    path = write_raw_gguf(tmp_path / "ok.gguf", "llama", TWO_TENSORS)
    data = path.read_bytes()
    assert [t.name for t in read_gguf(path)[1]] == list(TWO_TENSORS)
    cases = {  # a second tensor reading the first one's bytes, or one of 2^64 elements (int64 wraps to 0)
        "offset": (patch_tensor_info(data, "output_norm.weight", offset=0), "has its data at offset 0, expected"),
        "shape": (patch_tensor_info(data, "output_norm.weight", dims=(2**32,)), "is truncated"),
        "2d shape": (patch_tensor_info(data, "token_embd.weight", dims=(2**32, 2**32)), "is truncated"),
    }
    for case, (content, message) in cases.items():
        bad = tmp_path / f"{case.replace(' ', '_')}.gguf"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as e:
            read_gguf(bad)
        assert str(bad) in str(e.value), case
        assert ("'output_norm.weight'" if case != "2d shape" else "'token_embd.weight'") in str(e.value), case


@pytest.mark.parametrize("alignment", [0, 24])
def test_bad_alignment_is_a_value_error(tmp_path, alignment):
    path = write_raw_gguf(tmp_path / "a.gguf", "llama", TWO_TENSORS, {"general.alignment": alignment})
    with pytest.raises(ValueError, match=f"general.alignment must be a power of two, got {alignment}"):
        resolve_model(path)


def test_missing_embedding_and_rope_scaling_are_refused(tmp_path):
    path = write_raw_gguf(tmp_path / "a.gguf", "llama", {"output_norm.weight": TWO_TENSORS["output_norm.weight"]})
    with pytest.raises(ValueError, match="'token_embd.weight' \\(the token embedding\\) is missing"):
        resolve_model(path)
    path = write_raw_gguf(tmp_path / "b.gguf", "llama", TWO_TENSORS, {"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="RoPE scaling 'linear' is not supported for GGUF files"):
        resolve_model(path)
    config = LlamaConfig(**TINY)
    embedding = {"model.embed_tokens.weight": (np.zeros((512, 64), np.float32), T.F32)}
    path = write_gguf(tmp_path / "c.gguf", config, embedding, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=re.escape("RoPE scaling from rope_freqs.weight (Llama 3.1 style)")):
        resolve_model(path)


def test_unknown_tensor_and_architecture(tmp_path):
    config = LlamaConfig(**TINY)
    embedding = {"model.embed_tokens.weight": (np.zeros((512, 64), np.float32), T.F32)}
    path = write_gguf(tmp_path / "a.gguf", config, embedding,
                      extra={"blk.0.ffn_gate_inp.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=re.escape("'blk.0.ffn_gate_inp.weight' has no Hugging Face counterpart")):
        resolve_model(path)
    path = write_raw_gguf(tmp_path / "b.gguf", "gpt2",
                          {"token_embd.weight": (np.zeros((512, 64), np.float32), None)})
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        resolve_model(path)


@pytest.fixture(scope="module")
def smollm2():
    """(our source, transformers' config, transformers' tensors) for the bundled SmolLM2 GGUF."""
    source = resolve_model(None)
    with torch.device("meta"):  # only its parameter names are used, to map GGUF names to HF names
        skeleton = AutoModelForCausalLM.from_config(source.hf_config)
    # what from_pretrained(folder, gguf_file=...) runs; the q/k un-permutation uses its own config
    reference = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=skeleton)
    # and how AutoConfig.from_pretrained(folder, gguf_file=...) turns the parsed metadata into a config
    reference_config = CONFIG_MAPPING[reference["config"]["model_type"]].from_dict(reference["config"])
    return source, reference_config, reference["tensors"]


def test_smollm2_config_matches_transformers(smollm2):
    source, reference_config, _ = smollm2
    ours, theirs = source.hf_config.to_dict(), reference_config.to_dict()
    del ours["_name_or_path"], theirs["_name_or_path"]
    assert ours == theirs
    assert source.hf_config.tie_word_embeddings and source.hf_config.num_key_value_heads == 3


def test_smollm2_tensors_match_transformers(smollm2):
    source, _, reference = smollm2
    names = []
    for name, tensor, file in source.tensors():
        assert file == source.path.name
        assert torch.equal(tensor, reference[name]), name
        names.append(name)
    assert sorted(names) == sorted(reference) and len(names) == 272 and "lm_head.weight" not in names


def test_smollm2_q_k_rows_are_unpermuted(smollm2):
    """The raw GGUF rows of q/k differ from Hugging Face's: the loader must not pass them through."""
    source, _, reference = smollm2
    _, table = read_gguf(source.path)
    data = np.memmap(source.path, dtype=np.uint8, mode="r")
    raw = {t.name: t for t in table}["blk.0.attn_q.weight"]
    as_stored = dequantize(data[raw.start : raw.start + raw.nbytes].reshape(576, -1), raw.type)
    assert not np.array_equal(as_stored, reference["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_header_parser_agrees_with_gguf_reader(smollm2):
    source, _, _ = smollm2
    metadata, table = read_gguf(source.path)
    reader = gguf.GGUFReader(source.path)
    assert [(t.name, t.type, t.shape, t.start, t.nbytes) for t in table] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    string_array = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):  # string arrays (vocabulary, merges, ...) come as their length
            expected = len(field.data) if field.types == string_array else field.contents()
            assert metadata[key] == expected, key
