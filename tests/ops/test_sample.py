"""pnl.sample_tokens against the float64 reference and the distribution it must draw from."""

from __future__ import annotations

import math

import pytest
import torch
from ops_testing import DEVICES

from professional_nano_llm import ops
from professional_nano_llm.ops import ref


def sample(logits, temperature, seeds, steps) -> torch.Tensor:
    device = logits.device
    tokens = torch.full((logits.shape[0],), -7, dtype=torch.int64, device=device)
    ops.sample_tokens(tokens, logits, temperature.to(device), seeds.to(device), steps.to(device))
    return tokens.cpu()


def rows_of(n: int, seed: int = 0):
    """Seeds and steps of n rows: one request's n successive steps."""
    return torch.full((n,), seed, dtype=torch.int64), torch.arange(n, dtype=torch.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 40_000])
def test_each_token_has_the_best_reference_score(device, dtype, vocab):
    """The float64 reference scores every token as the kernels do, with exact logs: the token drawn
    scores within rounding of the best. Temperature 0 rows take exactly the first argmax."""
    g = torch.Generator().manual_seed(vocab)
    rows = 12
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    temperature = torch.tensor([0.0, 0.25, 0.7, 1.0, 1.5, 4.0] * 2)
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=g)
    steps = torch.randint(0, 10_000, (rows,), generator=g)
    tokens = sample(logits.to(device), temperature, seeds, steps)
    scores = ref.sample_scores(logits, temperature, seeds, steps)
    chosen = scores.gather(1, tokens[:, None])[:, 0]
    best = scores.max(dim=-1).values
    # float32 logs of noise up to 17: a few ulps of the score, which reaches |logit| / 0.25 + 17.
    torch.testing.assert_close(chosen, best, atol=1e-4 * (best.abs().max().item() + 1), rtol=0)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].double().argmax(-1))
    agree = (tokens == ref.sample_tokens(logits, temperature, seeds, steps)).float().mean().item()
    assert agree >= 10 / 12  # a flip needs two scores within rounding of each other


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_draws_follow_softmax_of_logits_over_temperature(device, temperature):
    """A chi-square test of 40 000 draws (one request's successive steps) against the definition."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, 0.0, -1.0, 0.9, 1.1, -3.0, 0.5, 0.2])
    n, vocab = 40_000, logits.numel()
    seeds, steps = rows_of(n, seed=11)
    tokens = sample(logits.expand(n, vocab).contiguous().to(device), torch.full((n,), temperature), seeds, steps)
    expected = (logits.double() / temperature).softmax(-1) * n
    observed = torch.bincount(tokens, minlength=vocab).double()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor((vocab - 1) / 2, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-4, f"chi2 {chi2.item():.1f} over {vocab - 1} degrees of freedom, p = {p_value:.2g}"


@pytest.mark.parametrize("device", DEVICES)
def test_the_chi_square_test_catches_a_wrong_temperature(device):
    """The same test fails for draws at another temperature, so it can tell."""
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, 0.0, -1.0, 0.9, 1.1, -3.0, 0.5, 0.2])
    n, vocab = 40_000, logits.numel()
    seeds, steps = rows_of(n, seed=11)
    tokens = sample(logits.expand(n, vocab).contiguous().to(device), torch.full((n,), 1.15), seeds, steps)
    expected = logits.double().softmax(-1) * n
    chi2 = ((torch.bincount(tokens, minlength=vocab).double() - expected) ** 2 / expected).sum()
    assert torch.special.gammaincc(torch.tensor(5.5, dtype=torch.float64), chi2 / 2).item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_draw_does_not_depend_on_its_batch(device):
    g = torch.Generator().manual_seed(3)
    vocab = 5000
    row = torch.randn(vocab, generator=g)
    alone = sample(row[None].to(device), torch.tensor([0.8]), torch.tensor([99]), torch.tensor([5]))
    others = torch.randn(9, vocab, generator=g)
    for position in (0, 4, 9):
        logits = torch.cat([others[:position], row[None], others[position:]])
        temperature = torch.rand(10, generator=g) + 0.1
        temperature[position] = 0.8
        seeds, steps = torch.randint(0, 1000, (10,), generator=g), torch.randint(0, 1000, (10,), generator=g)
        seeds[position], steps[position] = 99, 5
        assert sample(logits.to(device), temperature, seeds, steps)[position] == alone[0]


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_step_change_the_draw(device):
    logits = torch.zeros(4, 1000, device=device)  # uniform: any token is as likely
    tokens = sample(logits, torch.ones(4), torch.tensor([1, 2, 1, 1]), torch.tensor([0, 0, 1, 0]))
    assert tokens[0] == tokens[3] and len({tokens[0].item(), tokens[1].item(), tokens[2].item()}) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_minus_infinity_and_nan_are_never_drawn(device):
    logits = torch.full((3, 300), float("-inf"))
    logits[0, 17], logits[1, 250] = 0.0, -5.0
    logits[2, :] = float("nan")
    logits[1, 3] = float("nan")
    tokens = sample(logits.to(device), torch.tensor([1.0, 1.0, 1.0]), *rows_of(3))
    assert tokens.tolist() == [17, 250, 0]  # a row with nothing finite: token 0, as argmax of -inf


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    base = torch.randn(6, 1030, device=device)
    logits = base[:, 3:1003]  # rows 1030 apart
    assert not logits.is_contiguous()
    t, (seeds, steps) = torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0, 0.0]), rows_of(6, seed=4)
    assert torch.equal(sample(logits, t, seeds, steps), sample(logits.contiguous(), t, seeds, steps))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tokens=torch.zeros(3, dtype=torch.int32)), "tokens must be Long"),
        (dict(temperature=torch.ones(2)), r"temperature must be a contiguous \[3\]"),
        (dict(seeds=torch.zeros(3)), "seeds must be Long"),
        (dict(logits=torch.zeros(3, 0)), "vocabulary of 1 to"),
        (dict(logits=torch.zeros(3, 4, 5)), r"logits \[B, V\]"),
    ],
)
def test_rejects(device, change, message):
    args = dict(tokens=torch.zeros(3, dtype=torch.int64), logits=torch.zeros(3, 10), temperature=torch.ones(3),
                seeds=torch.zeros(3, dtype=torch.int64), steps=torch.zeros(3, dtype=torch.int64))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.sample_tokens(**{k: v.to(device) for k, v in args.items()})


@pytest.mark.parametrize("temperature", [-1.0, math.inf, math.nan])
def test_rejects_bad_temperatures_on_cpu(temperature):
    """CPU only: the CUDA op never reads the temperatures on the host."""
    with pytest.raises(RuntimeError, match=r"temperature\[1\] = .* must be finite and >= 0"):
        ops.sample_tokens(torch.zeros(2, dtype=torch.int64), torch.zeros(2, 10), torch.tensor([1.0, temperature]),
                          torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
