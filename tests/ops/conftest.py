"""Runs each CPU case on the kernels of the instruction set its cpu_isa mark names (ops_testing.py)."""

from __future__ import annotations

import pytest

from professional_nano_llm import ops


@pytest.fixture(autouse=True)
def _cpu_isa(request):
    mark = request.node.get_closest_marker("cpu_isa")
    if mark is None:
        yield
        return
    before = ops.cpu_isa()
    ops.set_cpu_isa(mark.args[0])
    try:
        yield
    finally:
        ops.set_cpu_isa(before)
