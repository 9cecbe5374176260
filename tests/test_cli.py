"""The pnl command line, run as a user would."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from professional_nano_llm import __version__
from professional_nano_llm.cli import _engine_args, _engine_kwargs

PNL = [sys.executable, "-m", "professional_nano_llm"]


def pnl(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PNL, *args], input=stdin, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_version_names_the_cpu_kernels_in_use():
    from professional_nano_llm import ops

    supported = ", ".join(ops.supported_cpu_isas())
    in_use = os.environ.get("PNL_CPU_ISA") or ops.supported_cpu_isas()[0]  # the best, unless forced
    result = pnl("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"professional-nano-llm {__version__}",
        f"CPU kernels: {in_use} (this CPU runs: {supported})",
    ]
    forced = pnl("--version", env={"PNL_CPU_ISA": "baseline"})
    assert forced.stdout.splitlines()[1] == f"CPU kernels: baseline (this CPU runs: {supported})"


def test_bad_cpu_isa_is_a_clear_error():
    result = pnl("--version", env={"PNL_CPU_ISA": "avx1024"})
    assert result.returncode != 0
    assert "PNL_CPU_ISA=avx1024: unknown CPU instruction set 'avx1024'; expected avx512, avx2 or baseline" in (
        result.stderr)


def test_generate_prints_each_completion():
    result = pnl("generate", "--max-tokens", "6", "--ignore-eos", "--kv-cache-memory-gb", "0.1", "Hello", "The sky is")
    assert result.returncode == 0, result.stderr
    assert "### Hello" in result.stdout and "### The sky is" in result.stdout
    assert result.stderr.count("[6 tokens, finish_reason=length]") == 2
    assert "KV cache:" in result.stderr  # the engine logs how many blocks and tokens fit


def test_chat_streams_replies_until_an_empty_line():
    result = pnl("chat", "--max-tokens", "16", "--kv-cache-memory-gb", "0.1", stdin="What is the capital of France?\n\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_invalid_arguments_give_a_clear_error():
    result = pnl("generate", "--temperature", "-1", "x")
    assert result.returncode == 2 and "pnl: error: temperature must be a finite number >= 0" in result.stderr
    result = pnl("generate", "--model", "/no/such/model", "x")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = pnl("generate", "--block-size", "12", "x")
    assert result.returncode == 2 and "pnl: error: block_size must be a power of two" in result.stderr
    result = pnl("generate", "--model", "no-such-org/no-such-model", "x", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "pnl: error:" in result.stderr and "hub is unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_engine_flags_reach_the_engine_config():
    parser = argparse.ArgumentParser()
    _engine_args(parser)
    args = parser.parse_args(["--enforce-eager", "--gpu-memory-utilization", "0.5", "--no-prefix-caching"])
    assert _engine_kwargs(args) == dict(enforce_eager=True, gpu_memory_utilization=0.5, enable_prefix_caching=False)
    assert _engine_kwargs(parser.parse_args([])) == {}
