"""Greedy generation is token-exact against transformers (float32, CPU), however the engine schedules it."""

from __future__ import annotations

import random

import pytest
import torch

from professional_nano_llm import ProfessionalLLM, SamplingParams
from professional_nano_llm.engine.model_runner import kv_bytes_per_block
from professional_nano_llm.models import model_config

from helpers import our_last_logits

from .conftest import hf_greedy, hf_last_logits

NEW_TOKENS = 64
TEXTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "The capital of France is",
    "List three colors:",
    "In 1969, humans first",
    "Water boils at",
    "Here is a short poem about the sea:\n",
]
# Scheduling variants that must not change a single token: prefix caching off, chunked prefill
# through a tiny token budget, and a KV cache so small that sequences are preempted and recomputed.
ENGINE_VARIANTS = {
    "default": {},
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=24),
    "preemption": dict(kv_cache_budget_blocks=12),
}


def engine_args(variant: str, hf_config) -> dict:
    args = dict(ENGINE_VARIANTS[variant])
    blocks = args.pop("kv_cache_budget_blocks", None)
    if blocks is not None:
        bytes_per_block = kv_bytes_per_block(model_config(hf_config), 16, torch.float32)
        args["kv_cache_memory_gb"] = blocks * bytes_per_block / (1 << 30)
        args["max_model_len"] = blocks * 16
    return args


def run_ours(llm: ProfessionalLLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def smollm_prompts(smollm_tokenizer):
    return [smollm_tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def smollm_reference(smollm_hf, smollm_prompts):
    return [hf_greedy(smollm_hf, p, NEW_TOKENS) for p in smollm_prompts]


@pytest.fixture(scope="module")
def smollm_llm(smollm_path):
    return ProfessionalLLM(str(smollm_path))


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_smollm_greedy_is_token_exact(
    variant, smollm_path, smollm_hf, smollm_llm, smollm_prompts, smollm_reference
):
    llm = smollm_llm if variant == "default" else ProfessionalLLM(
        str(smollm_path), **engine_args(variant, smollm_hf.config))
    ours = run_ours(llm, smollm_prompts)
    for i, (got, want) in enumerate(zip(ours, smollm_reference)):
        assert got == want, f"prompt {i} ({TEXTS[i]!r}) diverges at token {_first_difference(got, want)}"
    if variant == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_smollm_last_token_logits_match(smollm_llm, smollm_hf, smollm_prompts):
    for prompt in smollm_prompts:
        torch.testing.assert_close(our_last_logits(smollm_llm, prompt), hf_last_logits(smollm_hf, prompt),
                                   atol=1e-3, rtol=0)


def random_prompts(vocab: int, count: int = 8) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 90))] for _ in range(count)]


@pytest.mark.parametrize(
    "arch, variant",
    [(arch, variant) for arch in ["llama", "qwen2", "qwen3"] for variant in ENGINE_VARIANTS]
    + [("llama3-rope", "default")],
)
def test_tiny_random_models_greedy_is_token_exact(arch, variant, tiny_models):
    folder, hf_model = tiny_models[arch]
    prompts = random_prompts(hf_model.config.vocab_size)
    reference = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    llm = ProfessionalLLM(str(folder), **engine_args(variant, hf_model.config))
    for i, (got, want) in enumerate(zip(run_ours(llm, prompts), reference)):
        assert got == want, f"{arch} prompt {i} diverges at token {_first_difference(got, want)}"
    if variant == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    torch.testing.assert_close(our_last_logits(llm, prompts[0]), hf_last_logits(hf_model, prompts[0]),
                               atol=1e-3, rtol=0)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
