// The instruction sets the CPU kernels are compiled for, and the choice among them: the best set
// the CPU runs, unless set_cpu_isa (PNL_CPU_ISA) asks for another. Torch-free.
#pragma once

#include <string_view>
#include <vector>

namespace pnl::ops {

/// Ordered by what they need of the CPU: each set's CPUs also run the ones before it.
enum class CpuIsa {
  baseline,  // x86-64 (SSE2), or the target's default elsewhere
  avx2,      // x86-64-v3: AVX2, FMA, F16C
  avx512,    // x86-64-v4: AVX-512 F, BW, VL, DQ, CD
};

/// The set in use.
CpuIsa cpu_isa();

/// The sets that are compiled in and that this CPU runs, best first.
std::vector<CpuIsa> supported_cpu_isas();

/// Uses `isa` from now on; std::invalid_argument if it is not in supported_cpu_isas().
void set_cpu_isa(CpuIsa isa);

std::string_view cpu_isa_name(CpuIsa isa);

/// "baseline", "avx2" or "avx512"; std::invalid_argument for anything else.
CpuIsa parse_cpu_isa(std::string_view name);

}  // namespace pnl::ops
