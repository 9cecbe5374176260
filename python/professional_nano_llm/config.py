"""Engine settings (EngineConfig) and the architecture facts a model is built from (ModelConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Every knob of the engine; ProfessionalLLM(model, **kwargs) fills it from its keyword arguments."""

    model: str | None = None  # folder, .gguf file or hub id; None = the bundled SmolLM2-135M-Instruct
    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | None = None  # bfloat16 on GPU, float32 on CPU
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # per step; 8192 on GPU, 1024 on CPU
    max_model_len: int | None = None  # default: the model's context, capped by the KV cache
    enable_prefix_caching: bool = True
    # KV cache size; default: a quarter of free RAM (<= 4 GiB) on CPU, gpu_memory_utilization on GPU
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9  # GPU: fraction of device memory for weights, activations, KV
    num_threads: int | None = None  # CPU threads for torch; default: torch's choice
    seed: int = 0  # seeds requests that do not set their own
    enforce_eager: bool = False  # no CUDA graphs (the CPU always runs eagerly)
    # Plan each step while the device runs the one before (LLMEngine.step); None: on a GPU only.
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # accepted for nano-vLLM/vLLM code; only 1 is supported

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(self.device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size must be 1 (one device per engine), got {self.tensor_parallel_size}")
        if self.dtype is None:
            self.dtype = "bfloat16" if device.type == "cuda" else "float32"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if device.type == "cuda" else 1024
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (8 <= self.block_size <= 256 and self.block_size & (self.block_size - 1) == 0):
            raise ValueError(f"block_size must be a power of two from 8 to 256, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_kwargs(cls, model: str | None, kwargs: dict) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape, normalized from a Hugging Face config of any supported architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope: dict = field(default_factory=dict)  # rope_type, rope_theta and the type's own fields

