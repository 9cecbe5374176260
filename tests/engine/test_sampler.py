"""The sampler against the definitions of each parameter, written independently in plain torch/Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from professional_nano_llm.engine.sampler import Sampler, SamplingBatch, uniform_from_counter

V = 12
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_batch(rows: int, device: str = "cpu", **fields) -> SamplingBatch:
    """A batch of `rows` (temperature 1, the successive steps of a request of seed 0, nothing else
    set unless given) with its tensors on device."""
    base = dict(
        temperature=torch.ones(rows),
        top_k=None, top_p=None, min_p=None, uniform=None,
        repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
        seen_in_prompt=None, output_counts=None, banned=None, num_logprobs=-1,
        seeds=torch.zeros(rows, dtype=torch.int64), steps=torch.arange(rows),
    )
    base.update(fields)
    for name, value in base.items():
        if isinstance(value, torch.Tensor):
            base[name] = value.to(device)
        elif isinstance(value, tuple):
            base[name] = tuple(t.to(device) for t in value)
    return SamplingBatch(**base)


def draws(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(uniform_from_counter(np.full(rows, seed, np.uint64), np.arange(rows, dtype=np.uint64)))


def reference_distribution(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Filtered next-token distribution, straight from the definitions (float64)."""
    probs = (logits.double() / temperature).softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1:
        total = 0.0
        for rank, i in enumerate(order):  # the smallest prefix whose mass reaches top_p
            if total >= top_p:
                keep[order[rank:]] = False
                break
            total += probs[i].item()
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    filtered = torch.where(keep, probs, 0.0)
    return filtered / filtered.sum()


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double() / len(tokens)


LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, 0.0, -1.0, 0.9, 1.1, -3.0, 0.5, 0.2])


def test_uniform_from_counter_is_deterministic_and_uniform():
    seeds = np.arange(100_000, dtype=np.uint64)
    u = uniform_from_counter(seeds, np.zeros_like(seeds))
    assert ((u >= 0) & (u < 1)).all()
    np.testing.assert_array_equal(u, uniform_from_counter(seeds, np.zeros_like(seeds)))
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_500  # each decile ~10 000
    assert not np.array_equal(u, uniform_from_counter(seeds, np.ones_like(seeds)))  # the step matters


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax(device):
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits.to(device), make_batch(5, device, temperature=torch.zeros(5)))
    torch.testing.assert_close(out.tokens.cpu(), logits.argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=1.7),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=0.8, top_p=0.9, top_k=5),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=1.2, top_k=6, top_p=0.8, min_p=0.1),
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
@pytest.mark.parametrize("candidates", [3, 1024], ids=["3-candidates", "all-candidates"])
@pytest.mark.parametrize("device", DEVICES)
def test_sampled_distribution_matches_definition(params, candidates, device):
    """With 3 candidates most filtered rows need more than the top 3 and take the full sort."""
    n = 40_000
    expected = reference_distribution(LOGITS, **params)
    filtered = any(k in params for k in ("top_k", "top_p", "min_p"))
    batch = make_batch(
        n,
        device,
        temperature=torch.full((n,), params["temperature"]),
        uniform=draws(n),
        top_k=torch.full((n,), params.get("top_k", 0) or V) if filtered else None,
        top_p=torch.full((n,), params.get("top_p", 1.0)) if filtered else None,
        min_p=torch.full((n,), params.get("min_p", 0.0)) if filtered else None,
        max_top_k=params.get("top_k", 0),
    )
    tokens = Sampler(candidates)(LOGITS.expand(n, V).to(device), batch).tokens.cpu()
    got = empirical(tokens)
    assert (got[expected == 0] == 0).all(), "sampled a token the filters exclude"
    torch.testing.assert_close(got, expected, atol=0.01, rtol=0)


def test_filtered_and_unfiltered_rows_in_one_batch():
    """Rows without filters past the candidates draw from the whole distribution, no sort."""
    n = 40_000
    top_k = torch.tensor([2, V] * (n // 2))
    batch = make_batch(n, uniform=draws(n), top_k=top_k, top_p=torch.ones(n), min_p=torch.zeros(n), max_top_k=2)
    tokens = Sampler(candidates=3)(LOGITS.expand(n, V).clone(), batch).tokens
    torch.testing.assert_close(empirical(tokens[0::2]), reference_distribution(LOGITS, top_k=2), atol=0.01, rtol=0)
    torch.testing.assert_close(empirical(tokens[1::2]), reference_distribution(LOGITS), atol=0.01, rtol=0)


def test_mixed_greedy_and_sampled_rows():
    n = 2_000
    temperature = torch.tensor([0.0, 1.0] * (n // 2))
    tokens = Sampler()(LOGITS.expand(n, V).clone(), make_batch(n, temperature=temperature, uniform=draws(n))).tokens
    assert (tokens[0::2] == LOGITS.argmax()).all()
    assert len(set(tokens[1::2].tolist())) > 5


def test_seeded_row_is_independent_of_batch_composition():
    seed, step = 1234, 7
    alone = make_batch(1, seeds=torch.tensor([seed]), steps=torch.tensor([step]))
    token_alone = Sampler()(LOGITS[None].clone(), alone).tokens[0]
    others = torch.randn(9, V, generator=torch.Generator().manual_seed(1))
    logits = torch.cat([others[:4], LOGITS[None], others[4:]])
    seeds = torch.tensor([5, 6, 7, 8, seed, 9, 10, 11, 12, 13])
    steps = torch.tensor([0, 1, 2, 3, step, 4, 5, 6, 7, 8])
    batch = make_batch(10, seeds=seeds, steps=steps)
    assert Sampler()(logits, batch).tokens[4] == token_alone


def test_seeded_unfiltered_row_is_independent_of_filtered_neighbours():
    """A row without filters draws the same token whether or not other rows of its batch filter."""
    n = 64
    u = draws(n, seed=3)
    alone = make_batch(n, uniform=u)
    want = Sampler()(LOGITS.expand(n, V).clone(), alone).tokens
    top_k = torch.tensor([2, V] * (n // 2))
    mixed = make_batch(n, uniform=u, top_k=top_k, top_p=torch.ones(n), min_p=torch.zeros(n), max_top_k=2)
    for candidates in (3, 1024):
        got = Sampler(candidates)(LOGITS.expand(n, V).clone(), mixed).tokens
        assert torch.equal(got[1::2], want[1::2])


def reference_penalties(logits, prompt_ids, output_ids, repetition, presence, frequency):
    """HF repetition penalty over prompt + output, then OpenAI presence/frequency over the output."""
    out = [float(x) for x in logits]
    for t in set(prompt_ids) | set(output_ids):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output_ids):
        out[t] -= presence + frequency * output_ids.count(t)
    return torch.tensor(out)


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_their_definitions(device):
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.1, 0.0], [0.2, 0.4, -1.0, 2.0, 1.0, -3.0]])
    prompts = [[0, 1], [5]]
    outputs = [[3, 3, 1, 4], [2, 2, 2]]
    params = [(1.3, 0.5, 0.25), (0.7, -0.4, 1.5)]  # (repetition, presence, frequency)
    counts = torch.zeros(2, 6)
    seen = torch.zeros(2, 6, dtype=torch.bool)
    for row in range(2):
        for t in outputs[row]:
            counts[row, t] += 1
        seen[row, prompts[row]] = True
    batch = make_batch(
        2,
        device,
        repetition_penalty=torch.tensor([p[0] for p in params]),
        presence_penalty=torch.tensor([p[1] for p in params]),
        frequency_penalty=torch.tensor([p[2] for p in params]),
        seen_in_prompt=seen,
        output_counts=counts,
    )
    got = Sampler._apply_penalties(logits.to(device), batch).cpu()
    for row in range(2):
        expected = reference_penalties(logits[row], prompts[row], outputs[row], *params[row])
        torch.testing.assert_close(got[row], expected)


def test_banned_tokens_are_never_chosen():
    n = 500
    rows = torch.arange(n).repeat_interleave(2)
    ids = torch.tensor([0, 8] * n)  # the two most likely tokens
    batch = make_batch(n, uniform=draws(n), banned=(rows, ids))
    tokens = Sampler()(LOGITS.expand(n, V).clone(), batch).tokens
    assert not ((tokens == 0) | (tokens == 8)).any()
    greedy = Sampler()(LOGITS[None].clone(), make_batch(1, temperature=torch.zeros(1),
                                                        banned=(torch.tensor([0]), torch.tensor([0])))).tokens
    assert greedy.item() == 1  # the next best


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_raw_log_softmax_with_top_n(device):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    batch = make_batch(3, device, temperature=torch.zeros(3), num_logprobs=4,
                       repetition_penalty=torch.full((3,), 2.0), presence_penalty=torch.zeros(3),
                       frequency_penalty=torch.zeros(3), seen_in_prompt=torch.ones(3, V, dtype=torch.bool),
                       output_counts=torch.zeros(3, V))
    out = Sampler()(logits.to(device), batch)
    reference = logits.double().log_softmax(-1)  # before penalties: what the model said
    tokens = out.tokens.cpu()
    torch.testing.assert_close(out.logprobs.double().cpu(), reference.gather(1, tokens[:, None])[:, 0])
    values, ids = reference.topk(4, dim=-1)
    torch.testing.assert_close(out.top_logprobs.double().cpu(), values)
    torch.testing.assert_close(out.top_ids.cpu(), ids)
