"""The engine on a GPU against transformers on the same GPU, for tiny random Qwen3 and Llama models.

float32 greedy generation must be token-exact, with CUDA graphs and without; bfloat16 (the GPU
default) must track transformers' float32 logits closely. Run with `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from professional_nano_llm import ProfessionalLLM, SamplingParams
from random_model import random_model

from .conftest import TINY

pytestmark = pytest.mark.cuda

VOCAB, NEW_TOKENS = 512, 48
CONFIGS = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, tie_word_embeddings=True),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
}
# Lengths across block boundaries, a prompt longer than a 256-token decode partition, and more
# sequences than the smallest CUDA graph buckets.
PROMPT_LENS = [1, 5, 16, 17, 40, 100, 255, 300, 33, 8, 64, 129]


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    config = dict(TINY, vocab_size=VOCAB, eos_token_id=1, **CONFIGS[request.param])
    folder = random_model(config, tmp_path_factory.mktemp(request.param), torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    return folder, hf, prompts


@torch.no_grad()
def hf_greedy(hf, prompt):
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_float32_greedy_is_token_exact(tiny, enforce_eager):
    folder, hf, prompts = tiny
    llm = ProfessionalLLM(str(folder), device="cuda", dtype="float32", enforce_eager=enforce_eager,
                          max_num_seqs=16, kv_cache_memory_gb=1)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for i, prompt in enumerate(prompts):
        assert ours[i] == hf_greedy(hf, prompt), f"prompt {i} ({len(prompt)} tokens)"


def test_bfloat16_tracks_float32_logits(tiny):
    folder, hf, prompts = tiny
    llm = ProfessionalLLM(str(folder), device="cuda", max_num_seqs=16, kv_cache_memory_gb=1)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().log_softmax(-1)
        top = want.topk(5).indices.tolist()
        assert out.token_ids[0] in top[:2]
        for token, logprob in out.logprobs[0].items():
            assert abs(logprob - want[token].item()) < 0.5  # bf16 on the CPU: up to 0.33 here


def test_sampling_is_seeded_on_the_gpu(tiny):
    folder, _, prompts = tiny
    llm = ProfessionalLLM(str(folder), device="cuda", max_num_seqs=16, kv_cache_memory_gb=1)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True)
    first = llm.generate(prompts[:3], params, use_tqdm=False)
    again = llm.generate(prompts[2:3], params, use_tqdm=False)
    assert first[2].token_ids == again[0].token_ids
