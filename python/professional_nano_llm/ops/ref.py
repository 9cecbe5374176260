"""Pure-torch references of every pnl op: the test oracle, written for clarity, not speed.

Each one is functional (returns new tensors) and computes in float32, or in the input dtype when
that is float64, so tests can also run them in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def store_kv_cache(key, value, k_cache, v_cache, slot_mapping):
    """Returns copies of the caches with key/value [T, Hkv, D] written at slot_mapping [T] (-1 skipped)."""
    k_out, v_out = k_cache.clone(), v_cache.clone()
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_out.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_out.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)
    return k_out, v_out


def gather_context(cache, block_table, context_len):
    """[num_blocks, block_size, Hkv, D] cache -> [context_len, Hkv, D] tokens of one sequence."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:context_len]


def attention(q, k, v, scale, first_query_position):
    """Causal attention of q [Tq, H, D] (at positions first_query_position..) over k, v [Tk, Hkv, D]."""
    q, k, v = _acc(q), _acc(k), _acc(v)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = first_query_position + torch.arange(q.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def paged_attention_prefill(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    """query [T, H, D] -> [T, H, D]: each sequence's new tokens attend causally to its context."""
    out = torch.empty_like(query, dtype=_acc(query).dtype)
    for s in range(context_lens.shape[0]):
        start, end = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        ctx = int(context_lens[s])
        k = gather_context(k_cache, block_tables[s], ctx)
        v = gather_context(v_cache, block_tables[s], ctx)
        out[start:end] = attention(query[start:end], k, v, scale, ctx - (end - start))
    return out


def paged_attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale):
    """query [S, H, D] -> [S, H, D]: one new token per sequence, the last of its context."""
    num_seqs = query.shape[0]
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
    return paged_attention_prefill(query, k_cache, v_cache, cu, context_lens, block_tables, scale)


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    xf = _acc(x)
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * _acc(weight)


def fused_add_rms_norm(x, residual, weight, eps):
    """Returns (rms_norm(r) * weight, r) with r = x + residual rounded to residual's dtype.

    Like vLLM, the norm reads the new residual as it is stored, so in bfloat16 it normalises the
    rounded sum, not the exact one.
    """
    new_residual = (_acc(x) + _acc(residual)).to(residual.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def rotary_embedding(positions, query, key, cos_sin_cache, head_size):
    """Neox-style rotation of the first rot_dim dims of every head; returns new (query, key)."""

    def rotate(x):
        shape = x.shape
        x = _acc(x).reshape(x.shape[0], -1, head_size)
        cos, sin = _acc(cos_sin_cache)[positions.long()].chunk(2, dim=-1)  # [T, rot_dim / 2] each
        cos, sin = cos[:, None, :], sin[:, None, :]
        rot_dim = cos_sin_cache.shape[-1]
        x1, x2 = x[..., : rot_dim // 2], x[..., rot_dim // 2 : rot_dim]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot_dim:]], dim=-1)
        return rotated.reshape(shape)

    return rotate(query), rotate(key)


def qk_norm_rope_store(
    positions, query, key, value, q_weight, k_weight, eps, cos_sin_cache, k_cache, v_cache, slot_mapping
):
    """Returns new (query, key, k_cache, v_cache): the separate ops in turn, each output rounded to
    the input dtype as the op stores it (query [T, H, D], key and value [T, Hkv, D])."""
    q = rms_norm(query, q_weight, eps).to(query.dtype)
    k = rms_norm(key, k_weight, eps).to(key.dtype)
    q, k = rotary_embedding(positions, q, k, cos_sin_cache, query.shape[-1])
    q, k = q.to(query.dtype), k.to(key.dtype)
    k_out, v_out = store_kv_cache(k, value, k_cache, v_cache, slot_mapping)
    return q, k, k_out, v_out


def silu_and_mul(x):
    """silu(x[..., :d]) * x[..., d:] for x [..., 2 * d]."""
    gate, up = _acc(x).chunk(2, dim=-1)
    return F.silu(gate) * up


def linear(x, packed_weight, bias=None):
    """x [M, K] @ W^T (+ bias [N]) for packed_weight [N / 16, K, 16], unpacked here independently
    of ops.pack_linear_weight."""
    blocks, k, width = packed_weight.shape
    weight = packed_weight.permute(0, 2, 1).reshape(blocks * width, k)  # [N, K]
    return F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias))


def decoder_layer(
    hidden, residual, positions, input_norm_weight, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, o_weight,
    post_norm_weight, gate_up_weight, down_weight, cos_sin_cache, k_cache, v_cache, slot_mapping, num_decode_tokens,
    decode_context_lens, decode_block_tables, prefill_cu_seqlens_q, prefill_context_lens, prefill_block_tables,
    eps, scale,
):
    """Returns (output, hidden, residual, k_cache, v_cache) as the op leaves them: the references
    above in turn, every weight plain [out, in], each result rounded to the dtype the op stores."""
    dtype, tokens = hidden.dtype, hidden.shape[0]
    Hkv, D = k_cache.shape[2:]

    def project(x, weight, bias=None):
        return F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias)).to(dtype)

    normed, residual = fused_add_rms_norm(hidden, residual, input_norm_weight, eps)
    normed = normed.to(dtype)
    q, k, v = project(normed, qkv_weight, qkv_bias).split([qkv_weight.shape[0] - 2 * Hkv * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.reshape(tokens, -1, D), k.reshape(tokens, Hkv, D), v.reshape(tokens, Hkv, D)
    if q_norm_weight is not None:
        q, k, k_cache, v_cache = qk_norm_rope_store(
            positions, q, k, v, q_norm_weight, k_norm_weight, eps, cos_sin_cache, k_cache, v_cache, slot_mapping
        )
    else:
        q, k = (t.to(dtype) for t in rotary_embedding(positions, q, k, cos_sin_cache, D))
        k_cache, v_cache = store_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    nd = num_decode_tokens
    attn = torch.cat([
        paged_attention_decode(q[:nd], k_cache, v_cache, decode_context_lens, decode_block_tables, scale),
        paged_attention_prefill(q[nd:], k_cache, v_cache, prefill_cu_seqlens_q, prefill_context_lens,
                                prefill_block_tables, scale),
    ]).to(dtype)
    mlp_in, residual = fused_add_rms_norm(project(attn.reshape(tokens, -1), o_weight), residual, post_norm_weight, eps)
    act = silu_and_mul(project(mlp_in.to(dtype), gate_up_weight)).to(dtype)
    return project(act, down_weight), normed, residual, k_cache, v_cache


_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _mix32(x: np.ndarray) -> np.ndarray:  # uint64 arrays holding 32-bit values
    low = _U64(0xFFFFFFFF)
    x = ((x ^ (x >> _U64(16))) * _U64(0x85EBCA6B)) & low
    x = ((x ^ (x >> _U64(13))) * _U64(0xC2B2AE35)) & low
    return x ^ (x >> _U64(16))


def gumbel_noise(seeds, steps, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 noise -log(-log(u)) of sample_tokens, u from the hash of (seeds [B],
    steps [B], token id) that include/pnl/kernels/sample_noise.h defines."""
    with np.errstate(over="ignore"):
        seeds = seeds.cpu().numpy().astype(_U64)
        steps = steps.cpu().numpy().astype(_U64)
        key = _mix64(seeds * _U64(0x9E3779B97F4A7C15) + steps)[:, None]
        token = np.arange(vocab, dtype=_U64)[None, :]
        low, high = key & _U64(0xFFFFFFFF), key >> _U64(32)
        bits = _mix32((_mix32(token ^ low) + high) & _U64(0xFFFFFFFF)) >> _U64(8)
    u = (bits.astype(np.float64) + 0.5) / float(1 << 24)
    return torch.from_numpy(-np.log(-np.log(u)))


def sample_scores(logits, temperature, seeds, steps):
    """[B, V] float64 scores sample_tokens maximises: logits / T + gumbel_noise where T > 0, the
    logits where T == 0; NaN counts as -inf."""
    x = logits.double().cpu()
    t = temperature.double().cpu()[:, None]
    noisy = x / torch.where(t > 0, t, 1.0) + gumbel_noise(seeds, steps, x.shape[1])
    return torch.where(t > 0, noisy, x).nan_to_num(nan=float("-inf"), posinf=float("inf"))


def sample_tokens(logits, temperature, seeds, steps):
    """[B] int64: each row's token, the first argmax of sample_scores."""
    return sample_scores(logits, temperature, seeds, steps).argmax(dim=-1)
