"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


@dataclass
class SamplingParams:
    """Per-request sampling and stopping. Invalid values raise ValueError at construction.

    temperature 0 (or below 1e-5) is greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those filters.
    repetition_penalty (> 0, 1 = off) scales logits of tokens seen in the prompt or output
    (divides positive ones, multiplies negative ones); presence_penalty and frequency_penalty
    (OpenAI semantics, in [-2, 2]) subtract from the logits of tokens in the output.
    A seed makes the request's samples reproducible whatever else is in the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities per generated token (plus the sampled one)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))  # duplicates only cost time
        _check(_is_number(self.temperature) and 0 <= self.temperature < math.inf,
               "temperature must be a finite number >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k), "top_k must be an integer (<= 0 disables it)", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
               "repetition_penalty must be a finite number > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2]", value)
        _check(self.seed is None or _is_int(self.seed), "seed must be an integer or None", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", self.stop_token_ids)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens must be in [0, max_tokens]", self.min_tokens)
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or in [0, {MAX_LOGPROBS}]", self.logprobs)

    @property
    def greedy(self) -> bool:
        # As in vLLM: below 1e-5, logits / temperature overflows float32, so it means greedy.
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


def _check(ok: bool, message: str, value) -> None:
    if not ok:
        raise ValueError(f"{message}, got {value!r}")
