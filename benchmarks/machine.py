"""What a benchmark ran on: the CPU's model and the instruction set of our CPU kernels, and how to
hold torch's own CPU paths to one instruction set as well."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from professional_nano_llm import ops

# Environment that keeps torch's kernels (ATen's vectorised loops, MKL's GEMMs, oneDNN's) to what a
# CPU of that instruction set has, so both sides of a comparison run on the same one. MKL may not
# obey: on AMD CPUs it runs its AVX2 code whatever MKL_ENABLE_INSTRUCTIONS says (seen on Zen 4), so
# under "baseline" torch's F.linear and SDPA's matmuls still use AVX2.
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
    """"AMD EPYC 9R14, CPU kernels avx2 (this CPU runs avx512, avx2, baseline; torch limited by ...)"."""
    return (f"{cpu_model()}, CPU kernels {ops.cpu_isa()} (this CPU runs {', '.join(ops.supported_cpu_isas())}; "
            f"torch limited by: {torch_limits_in_effect()})")


def fma_peak() -> float | None:
    """The fp32 FMA peak of this machine in FLOP/s, on our kernels' instruction set, from the
    build's fma_peak (make build makes it); None without it."""
    binary = Path(__file__).resolve().parents[1] / "build" / sys.implementation.cache_tag / "fma_peak"
    if not binary.exists():
        return None
    env = {**os.environ, "PNL_CPU_ISA": ops.cpu_isa()}
    out = subprocess.run([str(binary)], capture_output=True, text=True, env=env, check=True).stdout
    return float(re.search(r": ([\d.]+) GFLOP/s", out).group(1)) * 1e9


def torch_limits_in_effect() -> str:
    """The TORCH_ISA_LIMITS variables this process runs under, or "none"."""
    names = {name for limits in TORCH_ISA_LIMITS.values() for name in limits}
    return " ".join(f"{name}={os.environ[name]}" for name in sorted(names) if name in os.environ) or "none"


def run_per_isa(script: str, isas: list[str]) -> None:
    """Runs `script` with this process's arguments but --isa once per instruction set (every one
    this CPU runs when none is named), each in a fresh process with PNL_CPU_ISA set and torch held
    to the same set."""
    argv = [a for a in sys.argv[1:] if a != "--isa" and a not in TORCH_ISA_LIMITS]
    for isa in isas or ops.supported_cpu_isas():
        print(f"\n### {isa}", flush=True)
        env = {**os.environ, **TORCH_ISA_LIMITS[isa], "PNL_CPU_ISA": isa}
        subprocess.run([sys.executable, script, *argv], env=env, check=True)
