// Every schema of the torch.ops.pnl namespace is declared here, in one place. The CPU and CUDA
// implementations register themselves from their own files with TORCH_LIBRARY_IMPL(pnl, ...).
// Shapes: T = tokens, S = sequences, H = query heads, Hkv = KV heads, D = head_dim.
#include <torch/library.h>

TORCH_LIBRARY(pnl, m) {
  // key, value [T, Hkv, D] -> k_cache, v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T]
  // (int32; slot -1 is skipped).
  m.def("store_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // Causal attention of each sequence's new tokens over its whole paged context. query, out
  // [T, H, D]; cu_seqlens_q [S + 1]; context_lens [S]; block_tables [S, max_blocks] (all int32).
  // The new tokens of sequence s are the last cu_seqlens_q[s+1] - cu_seqlens_q[s] of its
  // context_lens[s] tokens, whose KV must already be stored.
  m.def("paged_attention_prefill(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor cu_seqlens_q, Tensor context_lens, Tensor block_tables, float scale) -> ()");
  // One query token per sequence over its paged context. query, out [S, H, D].
  m.def("paged_attention_decode(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor context_lens, Tensor block_tables, float scale) -> ()");
  // out = input / sqrt(mean(input^2) + eps) * weight over the last dim. input, out [..., hidden].
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()");
  // residual += input; input = rms_norm(residual) * weight, in one pass. input, residual [T, hidden].
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // Neox-style rotary embedding, in place. positions [T] (int32 or int64); query [T, H * D] or
  // [T, H, D]; key [T, Hkv * D] or [T, Hkv, D]; cos_sin_cache [max_position, rot_dim] holds cos in
  // its first half and sin in its second; the first rot_dim dims of each head rotate.
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache, "
        "int head_size) -> ()");
  // Qwen3's attention front end in one pass: query [T, H, D] and key [T, Hkv, D] are each RMS-normed
  // per head (q_weight, k_weight [D]) and rotated like rotary_embedding, in place; then key and value
  // [T, Hkv, D] are stored like store_kv_cache. The result of rms_norm, rotary_embedding and
  // store_kv_cache in turn (on CPU the same bits; on CUDA up to the order of the sum of squares).
  m.def("qk_norm_rope_store(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor value, Tensor q_weight, "
        "Tensor k_weight, float eps, Tensor cos_sin_cache, Tensor(c!) k_cache, Tensor(d!) v_cache, "
        "Tensor slot_mapping) -> ()");
  // out [M, N] = input [M, K] W^T + bias [N]. W arrives packed as weight [N / 16, K, 16]: block b
  // holds features [16 b, 16 b + 16) side by side for each k (ops.pack_linear_weight).
  m.def("linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) -> ()");
  // out = silu(input[..., :d]) * input[..., d:]. input [..., 2 * d], out [..., d].
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  // One token per row of logits [B, V]: argmax(logits / temperature + Gumbel noise), which draws
  // from softmax(logits / temperature) in one pass; temperature [B] float32, 0 takes the argmax.
  // The noise is a hash of (seeds [B], steps [B], token id) (int64): a row's draw does not depend
  // on the rest of the batch. tokens [B] int64.
  m.def("sample_tokens(Tensor(a!) tokens, Tensor logits, Tensor temperature, Tensor seeds, Tensor steps) -> ()");
  // One pre-norm decoder block over a step's tokens, composed of the ops above. On entry hidden
  // [T, hidden_size] is the previous block's output (the embedding, with residual zero, for the
  // first); residual += hidden, hidden = rms_norm(residual), then attention adds into residual and
  // the MLP's output is returned. Weights as the model keeps them (packed, oneDNN or plain);
  // q_norm_weight and k_norm_weight for Qwen3, qkv_bias for Qwen2. H, Hkv and D come from the
  // caches [num_blocks, block_size, Hkv, D] and the qkv width. The first num_decode_tokens tokens
  // are one-token sequences (paged_attention_decode), the rest prefills (paged_attention_prefill).
  m.def("decoder_layer(Tensor(a!) hidden, Tensor(b!) residual, Tensor positions, Tensor input_norm_weight, "
        "Tensor qkv_weight, Tensor? qkv_bias, Tensor? q_norm_weight, Tensor? k_norm_weight, Tensor o_weight, "
        "Tensor post_norm_weight, Tensor gate_up_weight, Tensor down_weight, Tensor cos_sin_cache, "
        "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, int num_decode_tokens, "
        "Tensor decode_context_lens, Tensor decode_block_tables, Tensor prefill_cu_seqlens_q, "
        "Tensor prefill_context_lens, Tensor prefill_block_tables, float eps, float scale) -> Tensor");
}
