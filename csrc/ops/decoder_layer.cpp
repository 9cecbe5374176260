// decoder_layer: one pre-norm block (attention, then a SwiGLU MLP) as a single op. A step now
// crosses from Python into C++ once per layer instead of about twenty times: decoding one sequence
// on 2 CPU cores spent 3-4 ms of its ~24 ms per token in Python between the ops. It composes the
// other pnl ops through the dispatcher, so one implementation serves every device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace pnl::ops {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> pnl_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

/// x [M, K] -> [M, N] for W as the model keeps it: packed [N / 16, K, 16] for pnl.linear, oneDNN's
/// bfloat16 layout on CPU, or plain [N, K] (GPUs, and the shapes packing does not cover).
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias) {
  if (weight.is_mkldnn()) {
    // Called boxed: the unboxed signature of this internal op differs between torch versions.
    static const c10::OperatorHandle onednn =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, weight, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                            std::optional<std::string>()};
    onednn.callBoxed(&stack);
    return stack.at(0).toTensor();
  }
  if (weight.dim() == 3) {
    static const auto packed =
        pnl_op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&)>("pnl::linear");
    at::Tensor out = at::empty({x.size(0), weight.size(0) * weight.size(2)}, x.options());
    packed.call(out, x, weight, bias);
    return out;
  }
  return at::linear(x, weight, bias);
}

}  // namespace

at::Tensor decoder_layer(at::Tensor& hidden, at::Tensor& residual, const at::Tensor& positions,
                         const at::Tensor& input_norm_weight, const at::Tensor& qkv_weight,
                         const OptionalTensor& qkv_bias, const OptionalTensor& q_norm_weight,
                         const OptionalTensor& k_norm_weight, const at::Tensor& o_weight,
                         const at::Tensor& post_norm_weight, const at::Tensor& gate_up_weight,
                         const at::Tensor& down_weight, const at::Tensor& cos_sin_cache, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_decode_tokens,
                         const at::Tensor& decode_context_lens, const at::Tensor& decode_block_tables,
                         const at::Tensor& prefill_cu_seqlens_q, const at::Tensor& prefill_context_lens,
                         const at::Tensor& prefill_block_tables, double eps, double scale) {
  using Norm = void(at::Tensor&, at::Tensor&, const at::Tensor&, double);
  using QkNormRopeStore = void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double, const at::Tensor&, at::Tensor&, at::Tensor&,
                               const at::Tensor&);
  using Rotary = void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, int64_t);
  using StoreKv = void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&);
  using Decode = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, double);
  using Prefill = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, double);
  using SiluAndMul = void(at::Tensor&, const at::Tensor&);
  static const auto fused_add_rms_norm = pnl_op<Norm>("pnl::fused_add_rms_norm");
  static const auto qk_norm_rope_store = pnl_op<QkNormRopeStore>("pnl::qk_norm_rope_store");
  static const auto rotary_embedding = pnl_op<Rotary>("pnl::rotary_embedding");
  static const auto store_kv_cache = pnl_op<StoreKv>("pnl::store_kv_cache");
  static const auto paged_attention_decode = pnl_op<Decode>("pnl::paged_attention_decode");
  static const auto paged_attention_prefill = pnl_op<Prefill>("pnl::paged_attention_prefill");
  static const auto silu_and_mul = pnl_op<SiluAndMul>("pnl::silu_and_mul");

  TORCH_CHECK(hidden.dim() == 2, "hidden must be [T, hidden_size], got shape ", hidden.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) > 0 && k_cache.size(3) > 0,
              "k_cache must be [num_blocks, block_size, Hkv, D] with Hkv, D > 0, got shape ", k_cache.sizes());
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(),
              "q_norm_weight and k_norm_weight come together (Qwen3) or not at all");
  const int64_t tokens = hidden.size(0), num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(num_decode_tokens >= 0 && num_decode_tokens <= tokens, "num_decode_tokens must be in [0, ",
              tokens, "], got ", num_decode_tokens);

  fused_add_rms_norm.call(hidden, residual, input_norm_weight, eps);
  const at::Tensor qkv = project(hidden, qkv_weight, qkv_bias);  // [T, (H + 2 Hkv) D]
  const int64_t q_size = qkv.size(1) - 2 * num_kv_heads * head_dim, kv_size = num_kv_heads * head_dim;
  TORCH_CHECK(q_size > 0 && q_size % (num_kv_heads * head_dim) == 0, "qkv projection gives ", qkv.size(1),
              " features: not (H + 2 Hkv) * D for the cache's Hkv = ", num_kv_heads, ", D = ", head_dim,
              " and H a multiple of Hkv");
  const int64_t num_heads = q_size / head_dim;
  at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, num_heads, head_dim});  // strided views
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
  if (q_norm_weight.has_value()) {
    qk_norm_rope_store.call(positions, q, k, v, *q_norm_weight, *k_norm_weight, eps, cos_sin_cache, k_cache, v_cache,
                            slot_mapping);
  } else {
    rotary_embedding.call(positions, q, k, cos_sin_cache, head_dim);
    store_kv_cache.call(k, v, k_cache, v_cache, slot_mapping);
  }

  // The step's one-token (decode) sequences come first, then the prefills.
  at::Tensor attn = at::empty({tokens, num_heads, head_dim}, hidden.options());
  if (num_decode_tokens > 0) {
    at::Tensor out = attn.narrow(0, 0, num_decode_tokens);
    paged_attention_decode.call(out, q.narrow(0, 0, num_decode_tokens), k_cache, v_cache, decode_context_lens,
                                decode_block_tables, scale);
  }
  if (num_decode_tokens < tokens) {
    const int64_t prefill_tokens = tokens - num_decode_tokens;
    at::Tensor out = attn.narrow(0, num_decode_tokens, prefill_tokens);
    paged_attention_prefill.call(out, q.narrow(0, num_decode_tokens, prefill_tokens), k_cache, v_cache,
                                 prefill_cu_seqlens_q, prefill_context_lens, prefill_block_tables, scale);
  }
  at::Tensor mlp_in = project(attn.view({tokens, q_size}), o_weight, std::nullopt);
  fused_add_rms_norm.call(mlp_in, residual, post_norm_weight, eps);
  const at::Tensor gate_up = project(mlp_in, gate_up_weight, std::nullopt);  // [T, 2 * intermediate]
  at::Tensor act = at::empty({tokens, gate_up.size(1) / 2}, gate_up.options());
  silu_and_mul.call(act, gate_up);
  return project(act, down_weight, std::nullopt);
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CompositeExplicitAutograd, m) { m.impl("decoder_layer", &pnl::ops::decoder_layer); }
