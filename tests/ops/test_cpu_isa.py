"""The choice of CPU kernels: one copy per instruction set in one build, the best one the CPU runs
chosen at import, PNL_CPU_ISA to force one, and no copy using an instruction its CPUs may lack.

The op tests themselves run on every set this machine has (ops_testing.CPU_DEVICES); here the
build also runs, under QEMU, on emulated CPUs that lack AVX-512 (Haswell) and AVX (Nehalem).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from professional_nano_llm import _C, ops

ROOT = Path(__file__).resolve().parents[2]
X86_64 = platform.machine() in ("x86_64", "AMD64")
# What GCC's -march=x86-64-v3 and -v4 need of a CPU, as /proc/cpuinfo names it (abm is LZCNT).
X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

needs_x86_64 = pytest.mark.skipif(not X86_64, reason="the avx2 and avx512 kernels exist on x86-64 only")


def python(code: str, env: dict[str, str] | None = None, cpu: str | None = None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (under QEMU's model of `cpu`, when given)."""
    argv = [sys.executable, "-c", code]
    if cpu is not None:
        argv = [qemu(), "-cpu", cpu, *argv]
    environment = {k: v for k, v in os.environ.items() if k != "PNL_CPU_ISA"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**environment, **(env or {})})


def qemu() -> str:
    path = shutil.which("qemu-x86_64")
    assert path, "qemu-x86_64 is missing: install Debian's qemu-user (make test does)"
    return path


@needs_x86_64
def test_supported_sets_are_those_cpuinfo_lists():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    expected = [isa for isa, needs in (("avx512", X86_64_V4), ("avx2", X86_64_V3)) if needs <= flags] + ["baseline"]
    assert ops.supported_cpu_isas() == expected


def test_the_best_set_is_in_use_by_default():
    result = python("from professional_nano_llm import ops; print(ops.cpu_isa(), *ops.supported_cpu_isas())")
    assert result.returncode == 0, result.stderr
    in_use, *supported = result.stdout.split()
    assert in_use == supported[0] and supported[-1] == "baseline"


def test_set_cpu_isa_switches_and_refuses_unknown_names():
    before = ops.cpu_isa()
    try:
        for isa in ops.supported_cpu_isas():
            ops.set_cpu_isa(isa)
            assert ops.cpu_isa() == isa
        with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'; expected avx512, avx2 or baseline"):
            ops.set_cpu_isa("sse9")
        assert ops.cpu_isa() == ops.supported_cpu_isas()[-1]  # unchanged by the refusal
    finally:
        ops.set_cpu_isa(before)


@pytest.mark.parametrize("isa", ops.supported_cpu_isas())
def test_pnl_cpu_isa_forces_a_set_at_import(isa):
    result = python("from professional_nano_llm import ops; print(ops.cpu_isa())", env={"PNL_CPU_ISA": isa})
    assert result.returncode == 0 and result.stdout.strip() == isa, result.stderr


def test_pnl_cpu_isa_with_an_unknown_set_fails_the_import_clearly():
    result = python("import professional_nano_llm", env={"PNL_CPU_ISA": "AVX2"})
    assert result.returncode != 0
    assert "ImportError: PNL_CPU_ISA=AVX2: unknown CPU instruction set 'AVX2'" in result.stderr


def functions(disassembly: str) -> dict[str, list[str]]:
    """objdump -d's output as {symbol: [instruction, ...]}."""
    found: dict[str, list[str]] = {}
    body: list[str] = []
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            body = found.setdefault(header.group(1), [])
        elif "\t" in line:
            body.append(line.rsplit("\t", 1)[-1])
    return found


def instruction_set(symbol: str) -> str:
    """The set whose namespace a (mangled) symbol names: its own copy's code, or a template made for it."""
    if re.search(r"3(ops|cpu)6avx512", symbol):
        return "avx512"
    if re.search(r"3(ops|cpu)4avx2", symbol):
        return "avx2"
    return "baseline"


VEX = re.compile(r"^v[a-z]|%[yz]mm")  # AVX and later: VEX or EVEX encoded, or 256/512-bit registers
EVEX = re.compile(r"%zmm|%k[0-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")  # AVX-512 only


# GCC's copies of a function specialised for the calls of one object file (constant arguments,
# scalarised ones, a split-off part): local to that object, so of its instruction set.
LOCAL_CLONE = re.compile(r"\.(constprop|isra|part)\.\d+")


@needs_x86_64
def test_no_code_outside_a_sets_kernels_uses_its_instructions():
    """Code every CPU may run (the dispatch, torch's and the standard library's inline functions,
    load-time initialisers) has no AVX instruction, and the avx2 kernels no AVX-512 one: of an
    inline function that several sets' objects emit, the linker kept the copy of the least set."""
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True,
                                 text=True, check=True).stdout
    code = functions(disassembly)
    assert sum(instruction_set(name) == "avx512" for name in code) > 100  # the kernels are there, and found
    wrong = []
    for name, instructions in code.items():
        isa = instruction_set(name)
        if isa == "baseline" and not LOCAL_CLONE.search(name) and any(VEX.search(i) for i in instructions):
            wrong.append(f"{name}: {next(i for i in instructions if VEX.search(i))}")
        if isa == "avx2" and any(EVEX.search(i) for i in instructions):
            wrong.append(f"{name}: {next(i for i in instructions if EVEX.search(i))}")
    assert not wrong, "\n".join(wrong[:20])


EMULATED = {"Haswell": ["avx2", "baseline"], "Nehalem": ["baseline"]}  # no AVX-512; no AVX


@needs_x86_64
@pytest.mark.parametrize("cpu", EMULATED)
def test_an_emulated_cpu_gets_the_kernels_it_runs(cpu):
    expected = EMULATED[cpu]
    result = python("from professional_nano_llm import ops; print(*ops.supported_cpu_isas())", cpu=cpu)
    assert result.returncode == 0 and result.stdout.split() == expected, result.stderr
    refused = python("import professional_nano_llm", env={"PNL_CPU_ISA": "avx512"}, cpu=cpu)
    assert f"PNL_CPU_ISA=avx512: this CPU does not run the avx512 CPU kernels; it runs: {', '.join(expected)}" in (
        refused.stderr)


@needs_x86_64
@pytest.mark.parametrize("cpu", EMULATED)
def test_op_tests_pass_on_an_emulated_cpu(cpu):
    """The op tests, and the prepacked layers (bfloat16 included: oneDNN packs it only with AVX-512),
    on the best set of a CPU without AVX-512 or without AVX: an instruction it lacks would kill the
    process with SIGILL. Left out for time under emulation: the argument checks and opcheck (no
    kernel runs) and the two longest attention cases (each shape class is covered by others)."""
    isa = EMULATED[cpu][0]
    argv = [qemu(), "-cpu", cpu, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
            "-k", f"(cpu-{isa} and not (rejects or opcheck or prefill_long or decode_matches_prefill)) "
                  "or prepacked_linear_layer",
            str(ROOT / "tests" / "ops")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and re.search(r"\d+ passed", summary), result.stdout[-3000:] + result.stderr[-3000:]
