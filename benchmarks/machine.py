"""What a benchmark ran on: the CPU's model and the instruction set of our CPU kernels, and how to
hold torch's own CPU paths to one instruction set as well."""

from __future__ import annotations

import platform
import re
from pathlib import Path

from professional_nano_llm import ops

# Environment that keeps torch's kernels (ATen's vectorised loops, MKL's GEMMs, oneDNN's) to what a
# CPU of that instruction set has, so both sides of a comparison run on the same one.
TORCH_ISA_LIMITS = {
    "avx512": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                 "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if found:
            return found.group(1).strip()
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """"AMD EPYC 9R14, CPU kernels avx512 (this CPU runs avx512, avx2, baseline)"."""
    return f"{cpu_model()}, CPU kernels {ops.cpu_isa()} (this CPU runs {', '.join(ops.supported_cpu_isas())})"
