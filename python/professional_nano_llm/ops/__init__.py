"""The fused kernels (torch.ops.pnl.*), with typed wrappers and fake kernels for torch.compile.

Every op writes into tensors the caller owns, so the model allocates nothing per layer. The CPU and
CUDA implementations share one schema (csrc/bindings/torch_library.cpp); ops.ref holds the
pure-torch oracles. Index tensors (slot_mapping, cu_seqlens_q, context_lens, block_tables) are int32.
"""

from __future__ import annotations

import torch

from professional_nano_llm import _C  # registers torch.ops.pnl

_ops = torch.ops.pnl


def cpu_isa() -> str:
    """The instruction set of the CPU kernels in use: "avx512", "avx2" or "baseline"."""
    return _C.cpu_isa()


def supported_cpu_isas() -> list[str]:
    """The instruction sets this build has CPU kernels for and this CPU runs, best first."""
    return _C.supported_cpu_isas()


def set_cpu_isa(name: str) -> None:
    """Runs the CPU kernels of `name` from now on (as PNL_CPU_ISA does at import); ValueError if
    this build or this CPU lacks them."""
    _C.set_cpu_isa(name)


def store_kv_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """k_cache.view(-1, Hkv, D)[slot_mapping[t]] = key[t] (and v); slots of -1 are skipped.

    key, value [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; slot_mapping [T].
    """
    _ops.store_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def paged_attention_prefill(out, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    """out = softmax(q k^T * scale + causal mask) v for each sequence's new tokens over its context.

    query, out [T, H, D]; cu_seqlens_q [S + 1]; context_lens [S]; block_tables [S, max_blocks].
    Covers plain prefill, chunked prefill and prefix-cache hits; H may be a multiple of Hkv (GQA).
    """
    _ops.paged_attention_prefill(out, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


def paged_attention_decode(out, query, k_cache, v_cache, context_lens, block_tables, scale):
    """One query token per sequence (the last of its context). query, out [S, H, D]."""
    _ops.paged_attention_decode(out, query, k_cache, v_cache, context_lens, block_tables, scale)


def rms_norm(out, x, weight, eps: float) -> None:
    """out = x / sqrt(mean(x^2, -1) + eps) * weight. x, out [..., hidden]; weight [hidden]."""
    _ops.rms_norm(out, x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps: float) -> None:
    """residual += x; x = rms_norm(residual) * weight, in place. x, residual [T, hidden]."""
    _ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions, query, key, cos_sin_cache, head_size: int) -> None:
    """Neox rotary embedding in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per head.

    positions [T]; query [T, H * D]; key [T, Hkv * D]; cos_sin_cache [max_position, rot_dim].
    """
    _ops.rotary_embedding(positions, query, key, cos_sin_cache, head_size)


def qk_norm_rope_store(
    positions, query, key, value, q_weight, k_weight, eps: float, cos_sin_cache, k_cache, v_cache, slot_mapping
) -> None:
    """Qwen3's attention front end in one pass, in place: query and key are RMS-normed per head,
    rotated, and key and value stored into the caches: the result of rms_norm(q, q_weight),
    rms_norm(k, k_weight), rotary_embedding and store_kv_cache in turn (on CPU the same bits).

    positions [T]; query [T, H, D]; key, value [T, Hkv, D]; q_weight, k_weight [D];
    cos_sin_cache [max_position, rot_dim]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
    slot_mapping [T] (-1 skipped).
    """
    _ops.qk_norm_rope_store(
        positions, query, key, value, q_weight, k_weight, eps, cos_sin_cache, k_cache, v_cache, slot_mapping
    )


LINEAR_BLOCK = 16  # output features per block of a packed linear weight


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the layout `linear` reads, [N / 16, K, 16]: block b holds features
    [16 b, 16 b + 16), their 16 weights side by side for each k. N must be a multiple of 16."""
    n, k = weight.shape
    if n % LINEAR_BLOCK:
        raise ValueError(f"pack_linear_weight needs out_features divisible by {LINEAR_BLOCK}, got {n}")
    return weight.reshape(n // LINEAR_BLOCK, LINEAR_BLOCK, k).transpose(1, 2).contiguous()


def linear(out, x, weight, bias=None) -> None:
    """out = x @ W^T + bias with W packed by pack_linear_weight. x [M, K]; weight [N / 16, K, 16];
    bias [N] or None; out [M, N]."""
    _ops.linear(out, x, weight, bias)


def silu_and_mul(out, x) -> None:
    """out = silu(x[..., :d]) * x[..., d:]. x [..., 2 * d]; out [..., d]."""
    _ops.silu_and_mul(out, x)


def sample_tokens(tokens, logits, temperature, seeds, steps) -> None:
    """tokens[b] = argmax(logits[b] / temperature[b] + Gumbel noise): a draw from
    softmax(logits[b] / temperature[b]) in one pass; temperature 0 takes the argmax (the first on
    ties). The noise hashes (seeds[b], steps[b], token id), so a row's draw does not depend on the
    rest of the batch.

    tokens [B] int64 (out); logits [B, V] float; temperature [B] float32; seeds, steps [B] int64.
    """
    _ops.sample_tokens(tokens, logits, temperature, seeds, steps)


def decoder_layer(
    hidden, residual, positions, input_norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, o_weight,
    post_norm_weight, gate_up_weight, down_weight, cos_sin_cache, k_cache, v_cache, slot_mapping,
    num_decode_tokens: int, decode_context_lens, decode_block_tables, prefill_cu_seqlens_q, prefill_context_lens,
    prefill_block_tables, eps: float, scale: float,
) -> torch.Tensor:
    """One pre-norm decoder block in one call; returns its MLP output [T, hidden_size].

    hidden [T, hidden_size] is the previous block's output (for the first block the embedding,
    with residual [T, hidden_size] zero). In place: residual += hidden and hidden = its norm, then
    residual += the attention output; the new tokens' K/V go into k_cache, v_cache
    [num_blocks, block_size, Hkv, D] at slot_mapping [T]. Weights as the model keeps them (packed,
    oneDNN or plain); qkv_bias is Qwen2's, q/k_norm_weight [D] Qwen3's, else None. The first
    num_decode_tokens tokens are one-token sequences (decode_* [Sd], [Sd, max_blocks]); the rest
    are prefills (prefill_cu_seqlens_q [Sp + 1] counted from the first prefill token).
    """
    return _ops.decoder_layer(
        hidden, residual, positions, input_norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, o_weight,
        post_norm_weight, gate_up_weight, down_weight, cos_sin_cache, k_cache, v_cache, slot_mapping,
        num_decode_tokens, decode_context_lens, decode_block_tables, prefill_cu_seqlens_q, prefill_context_lens,
        prefill_block_tables, eps, scale,
    )


# Fake kernels: every op but decoder_layer only mutates its arguments, so tracing needs no output shapes.
for _name in (
    "store_kv_cache",
    "paged_attention_prefill",
    "paged_attention_decode",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "qk_norm_rope_store",
    "silu_and_mul",
    "linear",
    "sample_tokens",
):
    torch.library.register_fake(f"pnl::{_name}")(lambda *args, **kwargs: None)


@torch.library.register_fake("pnl::decoder_layer")
def _(hidden, *args, **kwargs):
    return torch.empty_like(hidden)  # the MLP projects back to hidden_size
