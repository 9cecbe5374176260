// The CPU adapters of one instruction set, as a table that cpu_dispatch.cpp calls through.
//
// Each *_cpu.cpp adapter, with the kernels it inlines, is compiled once per set (CMakeLists.txt,
// PNL_CPU_ISAS) into a namespace named after it, so no two copies share a symbol; cpu_ops.cpp,
// compiled with them, fills that set's table. torch.ops.pnl's CPU kernels forward every call to
// the table of the set in use (cpu_isa.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ops/cpu_isa.h"

namespace pnl::ops {

// The CPU adapters' signatures, as torch_library.cpp's schemas give them.
using StoreKvCacheFn = void(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping);
using PagedAttentionPrefillFn = void(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                     const at::Tensor& context_lens, const at::Tensor& block_tables, double scale);
using PagedAttentionDecodeFn = void(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& context_lens,
                                    const at::Tensor& block_tables, double scale);
using RmsNormFn = void(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
using FusedAddRmsNormFn = void(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double eps);
using RotaryEmbeddingFn = void(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                               const at::Tensor& cos_sin_cache, int64_t head_size);
using QkNormRopeStoreFn = void(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                               const at::Tensor& value, const at::Tensor& q_weight, const at::Tensor& k_weight,
                               double eps, const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                               const at::Tensor& slot_mapping);
using LinearFn = void(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias);
using SiluAndMulFn = void(at::Tensor& out, const at::Tensor& input);
using SampleTokensFn = void(at::Tensor& tokens, const at::Tensor& logits, const at::Tensor& temperature,
                            const at::Tensor& seeds, const at::Tensor& steps);

/// One instruction set's CPU adapters.
struct CpuOps {
  StoreKvCacheFn* store_kv_cache;
  PagedAttentionPrefillFn* paged_attention_prefill;
  PagedAttentionDecodeFn* paged_attention_decode;
  RmsNormFn* rms_norm;
  FusedAddRmsNormFn* fused_add_rms_norm;
  RotaryEmbeddingFn* rotary_embedding;
  QkNormRopeStoreFn* qk_norm_rope_store;
  LinearFn* linear;
  SiluAndMulFn* silu_and_mul;
  SampleTokensFn* sample_tokens;
};

#ifdef PNL_CPU_ISA
// In the translation units of one set: its adapters, defined in the *_cpu.cpp files.
namespace PNL_CPU_ISA {
StoreKvCacheFn store_kv_cache_cpu;
PagedAttentionPrefillFn paged_attention_prefill_cpu;
PagedAttentionDecodeFn paged_attention_decode_cpu;
RmsNormFn rms_norm_cpu;
FusedAddRmsNormFn fused_add_rms_norm_cpu;
RotaryEmbeddingFn rotary_embedding_cpu;
QkNormRopeStoreFn qk_norm_rope_store_cpu;
LinearFn linear_cpu;
SiluAndMulFn silu_and_mul_cpu;
SampleTokensFn sample_tokens_cpu;
}  // namespace PNL_CPU_ISA
#endif

// Each set's table (cpu_ops.cpp). Constant-initialised: no code of a set runs before it is chosen.
namespace baseline {
extern const CpuOps kCpuOps;
}
namespace avx2 {
extern const CpuOps kCpuOps;
}
namespace avx512 {
extern const CpuOps kCpuOps;
}

}  // namespace pnl::ops
