// This instruction set's table of CPU adapters (compiled once per set, like the adapters).
#include "ops/cpu_ops.h"

namespace pnl::ops::PNL_CPU_ISA {

constexpr CpuOps kCpuOps{
    .store_kv_cache = &store_kv_cache_cpu,
    .paged_attention_prefill = &paged_attention_prefill_cpu,
    .paged_attention_decode = &paged_attention_decode_cpu,
    .rms_norm = &rms_norm_cpu,
    .fused_add_rms_norm = &fused_add_rms_norm_cpu,
    .rotary_embedding = &rotary_embedding_cpu,
    .qk_norm_rope_store = &qk_norm_rope_store_cpu,
    .linear = &linear_cpu,
    .silu_and_mul = &silu_and_mul_cpu,
    .sample_tokens = &sample_tokens_cpu,
};

}  // namespace pnl::ops::PNL_CPU_ISA
