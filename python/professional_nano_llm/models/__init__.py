"""Supported architectures: Llama (SmolLM2, Llama 3.x, Mistral-style), Qwen2 and Qwen3."""

from professional_nano_llm.models.registry import SUPPORTED_ARCHITECTURES, build_model, model_config

__all__ = ["SUPPORTED_ARCHITECTURES", "build_model", "model_config"]
