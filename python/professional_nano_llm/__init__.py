"""Professional nano-vLLM: a readable, fast LLM inference engine with a C++ core."""

from __future__ import annotations

__version__ = "0.1.0"

import logging
import os

import torch  # first: loads libtorch and libc10, which _C links against

from . import _C

if _C.__version__ != __version__ or _C.torch_version != torch.__version__:
    raise ImportError(
        f"professional_nano_llm._C was built as version {_C.__version__} against torch "
        f"{_C.torch_version}, but this is version {__version__} with torch {torch.__version__}; "
        "rebuild it: pip install --no-build-isolation -e ."
    )

# PNL_CPU_ISA=avx512|avx2|baseline forces the CPU kernels of one instruction set (tests, diagnosis);
# by default the best one this CPU runs is in use.
if os.environ.get("PNL_CPU_ISA"):
    try:
        _C.set_cpu_isa(os.environ["PNL_CPU_ISA"])
    except ValueError as e:
        raise ImportError(f"PNL_CPU_ISA={os.environ['PNL_CPU_ISA']}: {e}") from None

_logger = logging.getLogger(__name__)
if not _logger.handlers:  # an application that configured our logger keeps its own setup
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    _logger.addHandler(_handler)
    _logger.setLevel(os.environ.get("PNL_LOG_LEVEL", "INFO").upper())
    _logger.propagate = False

__all__ = ["LLM", "ProfessionalLLM", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "professional_nano_llm.llm",
    "ProfessionalLLM": "professional_nano_llm.llm",
    "RequestOutput": "professional_nano_llm.engine.outputs",
    "SamplingParams": "professional_nano_llm.sampling_params",
}


def __getattr__(name: str):
    # The API pulls in transformers; import it on first use so the engine core stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'professional_nano_llm' has no attribute {name!r}")
