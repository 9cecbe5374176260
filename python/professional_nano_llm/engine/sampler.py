"""Batched sampling on the model's device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

Greedy and temperature-only rows take one pass over their logits, in the model's dtype
(pnl.sample_tokens: argmax of logits / T + Gumbel noise). Rows with top-k, top-p or min-p draw by
inverse CDF over their filtered distribution. Randomness is a counter-based hash of (request seed,
number of tokens generated so far), so a seeded request draws the same tokens whatever else is in
the batch, and again after preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from professional_nano_llm import ops
from professional_nano_llm.engine.batch import StepStaging

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
    uniform: torch.Tensor | None  # [B] float64 random draws of the filtered rows; None when no row filters
    repetition_penalty: torch.Tensor | None  # [B] float32; None when no row has penalties
    presence_penalty: torch.Tensor | None  # [B]
    frequency_penalty: torch.Tensor | None  # [B]
    seen_in_prompt: torch.Tensor | None  # [B, V] bool
    output_counts: torch.Tensor | None  # [B, V] float32
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked to -inf (min_tokens)
    num_logprobs: int  # max top-N over rows; 0 = none asked, -1 = no logprobs at all
    max_top_k: int = 0  # the largest top_k a row sets (0 = none), so the filters see all it keeps
    seeds: torch.Tensor | None = None  # [B] int64, each request's seed; None when every row is greedy
    steps: torch.Tensor | None = None  # [B] int64, tokens each request has generated


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, of the sampled tokens
    top_logprobs: torch.Tensor | None  # [B, N] float32
    top_ids: torch.Tensor | None  # [B, N] int64


class Sampler:
    def __init__(self, candidates: int = 1024):
        self.candidates = candidates  # tokens the top-k/top-p/min-p filters look at before a full sort

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:  # logits [B, V]
        raw_logprobs = logits.float().log_softmax(dim=-1) if batch.num_logprobs >= 0 else None
        logits = self._apply_penalties(logits, batch)
        if batch.banned is not None:
            logits = logits.index_put(batch.banned, torch.tensor(float("-inf"), device=logits.device))
        if batch.temperature is None:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
            ops.sample_tokens(tokens, logits, batch.temperature, batch.seeds, batch.steps)
            if batch.top_k is not None:
                self._draw_filtered(logits, batch, tokens)
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
        logits, counts = logits.float(), b.output_counts
        seen = b.seen_in_prompt | (counts > 0)
        rp = b.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
        return logits - b.frequency_penalty[:, None] * counts - b.presence_penalty[:, None] * (counts > 0)

    def _draw_filtered(self, logits: torch.Tensor, b: SamplingBatch, tokens: torch.Tensor) -> None:
        """Overwrites the tokens of the sampled rows that filter (top-k, top-p or min-p) with draws
        from their filtered distributions."""
        vocab = logits.shape[-1]
        filtered = (b.temperature > 0) & ((b.top_k < vocab) | (b.top_p < 1) | (b.min_p > 0))
        rows = filtered.nonzero()[:, 0]
        if rows.numel() == 0:
            return
        probs = (logits[rows].float() / b.temperature[rows, None]).softmax(dim=-1)
        top_k, top_p, min_p, uniform = b.top_k[rows], b.top_p[rows], b.min_p[rows], b.uniform[rows]
        # The filters keep a prefix of the tokens by descending probability. Sorting the whole
        # vocabulary every step is the slow part, so they run on the k most likely tokens.
        k = min(vocab, max(self.candidates, b.max_top_k))
        top, ids = probs.topk(k, dim=-1)  # sorted, descending
        drawn = _filtered_draw(top, ids, top_k, top_p, min_p, uniform)
        # A row whose kept prefix might reach past the k candidates takes the full sort (rare: a
        # flat distribution with top_p close to 1 and no top_k).
        mass = top.cumsum(dim=-1)[:, -1]
        covered = (top_k <= k) | ((top_p < 1) & (mass >= top_p)) | (top[:, -1] < min_p * top[:, 0])
        if not bool(covered.all()):
            again = (~covered).nonzero()[:, 0]
            ranked, order = probs[again].sort(dim=-1, descending=True)
            drawn[again] = _filtered_draw(ranked, order, top_k[again], top_p[again], min_p[again], uniform[again])
        tokens[rows] = drawn


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


def sampling_batch(requests: list, vocab_size: int, eos_token_ids: list[int], device: torch.device,
                   staging: StepStaging | None) -> SamplingBatch:
    """The SamplingBatch of a step's sampled requests (engine.request.Request, in row order), its
    per-row parameters moved to the device in one copy (through staging's pinned buffer on a GPU).
    A request's step, for its random draws and min_tokens, counts the tokens of steps still running."""
    params = [r.params for r in requests]
    num_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=-1)
    batch = SamplingBatch(None, None, None, None, None, None, None, None, None, None, None, num_logprobs)
    if any(not p.greedy for p in params):
        seeds = np.array([r.seed & 0xFFFF_FFFF_FFFF_FFFF for r in requests], dtype=np.uint64)  # any int
        steps = np.array([r.num_sampled for r in requests], dtype=np.uint64)
        floats = [[0.0 if p.greedy else p.temperature for p in params]]
        filtered = any(p.has_filters and not p.greedy for p in params)
        if filtered:
            floats += [uniform_from_counter(seeds, steps), [p.top_k if p.top_k > 0 else vocab_size for p in params],
                       [p.top_p for p in params], [p.min_p for p in params]]
        # One [rows, B] int64 table moves in one copy: the float64 rows as their bits, then seeds and steps.
        table = np.concatenate([np.array(floats, dtype=np.float64).view(np.int64),
                                np.stack([seeds, steps]).view(np.int64)])
        table = torch.from_numpy(table)
        table = staging.upload(table.view(-1)).view(table.shape) if staging is not None else table.to(device)
        values, (batch.seeds, batch.steps) = table[:-2].view(torch.float64), table[-2:]
        batch.temperature = values[0].float()
        if filtered:
            batch.uniform, batch.top_k = values[1], values[2].long()
            batch.top_p, batch.min_p = values[3].float(), values[4].float()
            batch.max_top_k = max(p.top_k for p in params)
    if any(p.has_penalties for p in params):
        _add_penalties(batch, requests, vocab_size, device)
    banned = [(row, t) for row, r in enumerate(requests) if r.num_sampled < r.params.min_tokens
              for t in (*eos_token_ids, *r.params.stop_token_ids)]
    if banned:
        rows, ids = zip(*banned)
        batch.banned = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
    return batch


def _add_penalties(batch: SamplingBatch, requests: list, vocab: int, device: torch.device) -> None:
    zeros = torch.zeros(vocab, dtype=torch.float32)
    batch.output_counts = torch.stack([r.output_counts if r.output_counts is not None else zeros
                                       for r in requests]).to(device)
    seen = torch.zeros(len(requests), vocab, dtype=torch.bool)
    for row, r in enumerate(requests):
        if r.params.repetition_penalty != 1:
            seen[row, torch.tensor(r.prompt_token_ids)] = True
    batch.seen_in_prompt = seen.to(device)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
    batch.repetition_penalty = as_tensor([r.params.repetition_penalty for r in requests])
    batch.presence_penalty = as_tensor([r.params.presence_penalty for r in requests])
    batch.frequency_penalty = as_tensor([r.params.frequency_penalty for r in requests])


class LogprobRows:
    """The sampler's logprob tensors, moved to the host once per step."""

    def __init__(self, result: SamplerOutput, tokens: list[int]):
        self.chosen = result.logprobs.cpu().tolist() if result.logprobs is not None else None
        self.tokens = tokens
        self.top_ids = result.top_ids.cpu().tolist() if result.top_ids is not None else None
        self.top_values = result.top_logprobs.cpu().tolist() if result.top_logprobs is not None else None

    def row(self, i: int, top_n: int | None) -> tuple[dict[int, float] | None, float | None]:
        if self.chosen is None:
            return None, None
        entry = dict(zip(self.top_ids[i][:top_n], self.top_values[i][:top_n])) if top_n and self.top_ids else {}
        entry[self.tokens[i]] = self.chosen[i]
        return entry, self.chosen[i]
