// torch.ops.pnl's CPU kernels: each forwards to the adapter of the instruction set in use, chosen
// at load from cpuid (the best set compiled in that the CPU runs) and changed by set_cpu_isa.
#include <torch/library.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <utility>

#include "ops/cpu_isa.h"
#include "ops/cpu_ops.h"

namespace pnl::ops {
namespace {

struct CompiledIsa {
  CpuIsa isa;
  const CpuOps* ops;
};

/// The sets compiled in (CMakeLists.txt, PNL_CPU_ISAS), best first.
constexpr CompiledIsa kCompiled[] = {
#ifdef PNL_CPU_X86_ISAS
    {CpuIsa::avx512, &avx512::kCpuOps},
    {CpuIsa::avx2, &avx2::kCpuOps},
#endif
    {CpuIsa::baseline, &baseline::kCpuOps},
};

/// Whether this CPU and its OS run isa's instructions (libgcc reads cpuid, and xgetbv for the
/// register state the OS saves).
bool cpu_runs(CpuIsa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::avx512: return __builtin_cpu_supports("x86-64-v4");
    case CpuIsa::avx2: return __builtin_cpu_supports("x86-64-v3");
    case CpuIsa::baseline: return true;
  }
  return false;
#else
  return isa == CpuIsa::baseline;
#endif
}

/// "avx512, avx2, baseline": the sets this build has that this CPU runs.
std::string supported_names() {
  std::string names;
  for (CpuIsa isa : supported_cpu_isas()) names += (names.empty() ? "" : ", ") + std::string(cpu_isa_name(isa));
  return names;
}

const CompiledIsa& best_supported() {
  for (const CompiledIsa& c : kCompiled) {
    if (cpu_runs(c.isa)) return c;
  }
  return kCompiled[std::size(kCompiled) - 1];  // baseline, which every CPU runs
}

std::atomic<const CompiledIsa*>& in_use() {
  static std::atomic<const CompiledIsa*> current{&best_supported()};
  return current;
}

/// A CPU kernel of torch.ops.pnl that calls the adapter at Member of the table in use.
template <auto Member>
struct Forward;

template <typename... Args, void (*CpuOps::*Member)(Args...)>
struct Forward<Member> {
  static void call(Args... args) {
    (in_use().load(std::memory_order_relaxed)->ops->*Member)(std::forward<Args>(args)...);
  }
};

}  // namespace

CpuIsa cpu_isa() { return in_use().load(std::memory_order_relaxed)->isa; }

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> isas;
  for (const CompiledIsa& c : kCompiled) {
    if (cpu_runs(c.isa)) isas.push_back(c.isa);
  }
  return isas;
}

void set_cpu_isa(CpuIsa isa) {
  for (const CompiledIsa& c : kCompiled) {
    if (c.isa != isa) continue;
    if (!cpu_runs(isa)) {
      throw std::invalid_argument("this CPU does not run the " + std::string(cpu_isa_name(isa)) +
                                  " CPU kernels; it runs: " + supported_names());
    }
    in_use().store(&c, std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument("the " + std::string(cpu_isa_name(isa)) +
                              " CPU kernels are not compiled into this build; it has: " + supported_names());
}

std::string_view cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::baseline: return "baseline";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::avx512: return "avx512";
  }
  return "unknown";
}

CpuIsa parse_cpu_isa(std::string_view name) {
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512}) {
    if (name == cpu_isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown CPU instruction set '" + std::string(name) +
                              "'; expected avx512, avx2 or baseline");
}

}  // namespace pnl::ops

TORCH_LIBRARY_IMPL(pnl, CPU, m) {
  using pnl::ops::CpuOps;
  using pnl::ops::Forward;
  m.impl("store_kv_cache", &Forward<&CpuOps::store_kv_cache>::call);
  m.impl("paged_attention_prefill", &Forward<&CpuOps::paged_attention_prefill>::call);
  m.impl("paged_attention_decode", &Forward<&CpuOps::paged_attention_decode>::call);
  m.impl("rms_norm", &Forward<&CpuOps::rms_norm>::call);
  m.impl("fused_add_rms_norm", &Forward<&CpuOps::fused_add_rms_norm>::call);
  m.impl("rotary_embedding", &Forward<&CpuOps::rotary_embedding>::call);
  m.impl("qk_norm_rope_store", &Forward<&CpuOps::qk_norm_rope_store>::call);
  m.impl("linear", &Forward<&CpuOps::linear>::call);
  m.impl("silu_and_mul", &Forward<&CpuOps::silu_and_mul>::call);
  m.impl("sample_tokens", &Forward<&CpuOps::sample_tokens>::call);
}
