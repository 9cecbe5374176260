"""decoder_layer against ops.ref: Llama, Qwen2 (qkv bias) and Qwen3 (q/k norm) blocks, MHA/GQA/MQA,
steps of decodes, prefills (some over cached context) or both, every weight layout the model
keeps (packed, oneDNN bfloat16, plain), bad arguments, and a model's block binding its operands."""

from __future__ import annotations

import pytest
import torch
from ops_testing import CPU_DEVICES, DEVICES, TOLERANCES, paged_kv
from professional_nano_llm import ops
from professional_nano_llm.layers.attention import AttentionMetadata
from professional_nano_llm.layers.linear import prepack_weight
from professional_nano_llm.models.registry import build_model, model_config
from professional_nano_llm.ops import ref
from test_rotary import cos_sin_cache
from transformers import LlamaConfig

HIDDEN, INTERMEDIATE, EPS = 64, 96, 1e-6


def weight(out_features, in_features, dtype, device):
    return (torch.randn(out_features, in_features, device=device) / in_features**0.5).to(dtype)


def make_layer(arch, H, Hkv, D, decode_lens, prefills, block_size, dtype, device):
    """Args of one block over a step: one-token sequences with contexts decode_lens, then prefills
    given as (context_len, new_tokens); their earlier context is random K/V already cached."""
    torch.manual_seed(0)
    lens = list(decode_lens) + [c for c, _ in prefills]
    k_cache, v_cache, block_tables, context_lens = paged_kv(lens, Hkv, D, block_size, dtype, device)
    new_tokens = [1] * len(decode_lens) + [n for _, n in prefills]
    positions = torch.cat([torch.arange(c - n, c) for c, n in zip(lens, new_tokens)])
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(new_tokens))
    tables = block_tables.cpu().long()
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    nd, T = len(decode_lens), sum(new_tokens)
    cu = torch.tensor([0] + new_tokens[nd:], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    f = dict(dtype=dtype, device=device)
    return dict(
        hidden=torch.randn(T, HIDDEN, **f),
        residual=torch.randn(T, HIDDEN, **f),
        positions=positions.to(device),
        input_norm_weight=torch.rand(HIDDEN, **f) + 0.5,
        qkv_weight=weight((H + 2 * Hkv) * D, HIDDEN, dtype, device),
        qkv_bias=torch.randn((H + 2 * Hkv) * D, **f) if arch == "qwen2" else None,
        q_norm_weight=torch.rand(D, **f) + 0.5 if arch == "qwen3" else None,
        k_norm_weight=torch.rand(D, **f) + 0.5 if arch == "qwen3" else None,
        o_weight=weight(HIDDEN, H * D, dtype, device),
        post_norm_weight=torch.rand(HIDDEN, **f) + 0.5,
        gate_up_weight=weight(2 * INTERMEDIATE, HIDDEN, dtype, device),
        down_weight=weight(HIDDEN, INTERMEDIATE, dtype, device),
        cos_sin_cache=cos_sin_cache(512, D, dtype, device),
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slots.to(torch.int32).to(device),
        num_decode_tokens=nd,
        decode_context_lens=context_lens[:nd],
        decode_block_tables=block_tables[:nd],
        prefill_cu_seqlens_q=cu.to(device),
        prefill_context_lens=context_lens[nd:],
        prefill_block_tables=block_tables[nd:],
        eps=EPS,
        scale=D**-0.5,
    )


WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def check_against_ref(args, layout, atol, rtol):
    expected = ref.decoder_layer(**args)
    run = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if layout == "prepacked":  # packed [N / 16, K, 16] for float32, oneDNN's layout for bfloat16
        run.update({name: prepack_weight(args[name]) for name in WEIGHTS})
        assert run["qkv_weight"].dim() == 3 or run["qkv_weight"].is_mkldnn
    out = ops.decoder_layer(**run)
    actual = (out, run["hidden"], run["residual"], run["k_cache"], run["v_cache"])
    for name, a, e in zip(("output", "hidden", "residual", "k_cache", "v_cache"), actual, expected):
        torch.testing.assert_close(a.to(e.dtype), e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


STEPS = {
    "decodes": dict(decode_lens=[1, 17, 40], prefills=[]),
    "prefills": dict(decode_lens=[], prefills=[(5, 5), (33, 33)]),
    "mixed": dict(decode_lens=[9, 70], prefills=[(21, 21), (50, 13)]),  # 50/13: 37 tokens cached
}


@pytest.mark.parametrize("device", CPU_DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("layout", ["prepacked", "plain"])
def test_matches_ref_float32(device, arch, heads, step, layout):
    args = make_layer(arch, *heads, 32, **STEPS[step], block_size=16, dtype=torch.float32, device=device)
    check_against_ref(args, layout, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("device", CPU_DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [8, 256])
def test_head_dim_64_and_block_sizes(device, arch, block_size):
    args = make_layer(arch, 4, 2, 64, **STEPS["mixed"], block_size=block_size, dtype=torch.float32, device=device)
    check_against_ref(args, "prepacked", atol=5e-5, rtol=1e-5)


# The reference rounds to bfloat16 wherever the op stores, so on CPU both agree to the bit here;
# the elementwise table still allows an ulp flipped by another summation order.
@pytest.mark.parametrize("device", CPU_DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("layout", ["prepacked", "plain"])
def test_matches_ref_bfloat16(device, arch, layout):
    args = make_layer(arch, 4, 2, 32, **STEPS["mixed"], block_size=16, dtype=torch.bfloat16, device=device)
    check_against_ref(args, layout, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_ref_cuda(device, arch, dtype):
    args = make_layer(arch, 4, 2, 64, **STEPS["mixed"], block_size=16, dtype=dtype, device=device)
    # cuBLAS and the CUDA attention sum in other orders: in bfloat16 a flipped ulp is carried on.
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    check_against_ref(args, "plain", **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k_norm_weight=None), "come together"),
        (dict(qkv_weight=torch.randn(5 * 32 + 1, HIDDEN)), "not \\(H \\+ 2 Hkv\\) \\* D"),
        (dict(num_decode_tokens=99), "num_decode_tokens must be in"),
        (dict(hidden=torch.randn(1, 2, HIDDEN)), "hidden must be \\[T, hidden_size\\]"),
        (dict(k_cache=torch.randn(4, 16, 0, 32), v_cache=torch.randn(4, 16, 0, 32)), "with Hkv, D > 0"),
    ],
)
def test_bad_arguments(device, change, message):
    args = make_layer("qwen3", 4, 2, 32, **STEPS["mixed"], block_size=16, dtype=torch.float32, device=device)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    caches = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        ops.decoder_layer(**args)
    # Refused before anything is stored.
    assert torch.equal(args["k_cache"], caches[0]) and torch.equal(args["v_cache"], caches[1])


def test_model_layer_runs_only_once_bound():
    """A model's block gets its operands from bind_kv_cache (before that, a clear error), and then
    computes what the reference computes from the block's own parameters."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=EPS)
    layer = build_model(model_config(cfg), 512, torch.float32, torch.device("cpu")).model.layers[0]
    for p in layer.parameters():
        p.data.copy_(torch.randn_like(p) * 0.2 + (1 if p.dim() == 1 else 0))  # norm weights near 1
    args = make_layer("llama", 2, 1, 32, **STEPS["mixed"], block_size=16, dtype=torch.float32, device="cpu")
    attn, mlp = layer.self_attn, layer.mlp
    args.update(input_norm_weight=layer.input_layernorm.weight, qkv_weight=attn.qkv_proj.weight,
                o_weight=attn.o_proj.weight, post_norm_weight=layer.post_attention_layernorm.weight,
                gate_up_weight=mlp.gate_up_proj.weight, down_weight=mlp.down_proj.weight,
                cos_sin_cache=attn.rotary.cos_sin_cache)
    expected = ref.decoder_layer(**args)[0]
    meta = AttentionMetadata(*(args[k] for k in (
        "slot_mapping", "num_decode_tokens", "decode_context_lens", "decode_block_tables", "prefill_cu_seqlens_q",
        "prefill_context_lens", "prefill_block_tables")))
    hidden, residual = args["hidden"].clone(), args["residual"].clone()
    with pytest.raises(RuntimeError, match="once bind_kv_cache"):
        layer(args["positions"], hidden, residual, meta)
    layer.bind_kv_cache(args["k_cache"].clone(), args["v_cache"].clone())
    torch.testing.assert_close(layer(args["positions"], hidden, residual, meta), expected, atol=5e-5, rtol=1e-5)
