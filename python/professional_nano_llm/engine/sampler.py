"""Batched sampling on the model's device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Randomness is a counter-based hash of (request seed, number of tokens generated so far), so a
seeded request draws the same numbers whatever else is in the batch, and again after preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def uniform_from_counter(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """[B] uint64 seeds and [B] steps -> [B] float64 in [0, 1), via SplitMix64 (public domain constants)."""
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + steps.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row parameters of one step's sampled sequences (row = ScheduleOutput.sampled_seq_ids order)."""

    temperature: torch.Tensor | None  # [B] float32, 0 = greedy; None when every row is greedy
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled; None when no row filters
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    uniform: torch.Tensor | None  # [B] float64 random draws; None when every row is greedy
    repetition_penalty: torch.Tensor | None  # [B] float32; None when no row has penalties
    presence_penalty: torch.Tensor | None  # [B]
    frequency_penalty: torch.Tensor | None  # [B]
    seen_in_prompt: torch.Tensor | None  # [B, V] bool
    output_counts: torch.Tensor | None  # [B, V] float32
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked to -inf (min_tokens)
    num_logprobs: int  # max top-N over rows; 0 = none asked, -1 = no logprobs at all
    max_top_k: int = 0  # the largest top_k a row sets (0 = none), so the filters see all it keeps


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, of the sampled tokens
    top_logprobs: torch.Tensor | None  # [B, N] float32
    top_ids: torch.Tensor | None  # [B, N] int64


class Sampler:
    def __init__(self, candidates: int = 1024):
        self.candidates = candidates  # tokens the top-k/top-p/min-p filters look at before a full sort

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:  # logits [B, V] float32
        raw_logprobs = logits.log_softmax(dim=-1) if batch.num_logprobs >= 0 else None
        logits = self._apply_penalties(logits, batch)
        if batch.banned is not None:
            logits = logits.index_put(batch.banned, torch.tensor(float("-inf"), device=logits.device))
        greedy = logits.argmax(dim=-1)
        if batch.uniform is None:
            tokens = greedy
        else:
            sampled = self._sample(logits, batch)
            tokens = torch.where(batch.temperature == 0, greedy, sampled)
        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0]
        if batch.num_logprobs == 0:
            return SamplerOutput(tokens, chosen, None, None)
        top = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return SamplerOutput(tokens, chosen, top.values, top.indices)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        if b.repetition_penalty is None:
            return logits
        counts = b.output_counts
        seen = b.seen_in_prompt | (counts > 0)
        rp = b.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        return logits - b.frequency_penalty[:, None] * counts - b.presence_penalty[:, None] * (counts > 0)

    def _sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(b.temperature == 0, 1.0, b.temperature)
        probs = (logits / temperature[:, None]).softmax(dim=-1)
        if b.top_k is None:
            return _inverse_cdf(probs, b.uniform)
        # The filters keep a prefix of the tokens by descending probability. Sorting the whole
        # vocabulary every step is the slow part, so they run on the k most likely tokens.
        vocab = probs.shape[-1]
        k = min(vocab, max(self.candidates, b.max_top_k))
        top, ids = probs.topk(k, dim=-1)  # sorted, descending
        tokens = _filtered_draw(top, ids, b.top_k, b.top_p, b.min_p, b.uniform)
        sampled = b.temperature > 0
        # A row that filters nothing draws in vocabulary order, as in a batch where no row filters:
        # a seeded request's tokens must not depend on its neighbours' parameters.
        unfiltered = sampled & (b.top_k >= vocab) & (b.top_p >= 1) & (b.min_p <= 0)
        # A filtered row whose kept prefix might reach past the k candidates takes the full sort
        # (rare: a flat distribution with top_p close to 1 and no top_k).
        mass = top.cumsum(dim=-1)[:, -1]
        covered = (b.top_k <= k) | ((b.top_p < 1) & (mass >= b.top_p)) | (top[:, -1] < b.min_p * top[:, 0])
        uncovered = sampled & ~unfiltered & ~covered
        if bool(unfiltered.any()):
            rows = unfiltered.nonzero()[:, 0]
            tokens[rows] = _inverse_cdf(probs[rows], b.uniform[rows])
        if bool(uncovered.any()):
            rows = uncovered.nonzero()[:, 0]
            ranked, order = probs[rows].sort(dim=-1, descending=True)
            tokens[rows] = _filtered_draw(ranked, order, b.top_k[rows], b.top_p[rows], b.min_p[rows], b.uniform[rows])
        return tokens


def _filtered_draw(ranked, ids, top_k, top_p, min_p, uniform) -> torch.Tensor:
    """Draws from probabilities sorted in descending order (ranked [B, n], their token ids [B, n])
    after top-k, top-p (the smallest prefix whose mass reaches top_p) and min-p."""
    rank = torch.arange(ranked.shape[-1], device=ranked.device)
    cum_before = ranked.cumsum(dim=-1) - ranked
    drop = (rank[None, :] >= top_k[:, None]) | ((cum_before >= top_p[:, None]) & (top_p[:, None] < 1))
    drop |= ranked < min_p[:, None] * ranked[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    kept = ranked.masked_fill(drop, 0.0)
    return ids.gather(1, _inverse_cdf(kept, uniform)[:, None])[:, 0]


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i], per row; unnormalized probs are fine."""
    cdf = probs.double().cumsum(dim=-1)
    target = uniform.to(cdf.device) * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return index.clamp_(max=probs.shape[-1] - 1)
