"""A request's Python-side state: output tokens, text, logprobs, stop strings, timings."""

from __future__ import annotations

import time

from professional_nano_llm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from professional_nano_llm.sampling_params import SamplingParams
from professional_nano_llm.tokenizer import IncrementalDetokenizer


class Request:
    def __init__(
        self,
        request_id: str,
        seq_id: int,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        tokenizer,
        stream: bool,
    ):
        self.request_id, self.seq_id, self.prompt = request_id, seq_id, prompt
        self.prompt_token_ids, self.params, self.seed = prompt_token_ids, params, seed
        self.tokenizer = tokenizer
        self.output_token_ids: list[int] = []
        self.num_sampled = 0  # tokens drawn so far, those of steps still running included
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        # Text is built token by token only when someone reads it while running (streaming) or
        # stop strings must be found; otherwise it is decoded once at the end.
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
            if stream or params.stop
            else None
        )
        self.text = ""
        self.output_counts = None  # [vocab] float32, kept by the engine for penalties

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprobs: dict[int, float] | None, logprob: float | None,
               stop_token: bool = False) -> bool:
        """Adds a sampled token; returns True when a stop string ended the request. stop_token: the
        scheduler ends the request on this token (EOS or stop_token_ids); as in vLLM, its text is
        left out unless include_stop_str_in_output."""
        now, metrics = time.monotonic(), self.metrics
        if metrics.last_token_time is None:
            metrics.first_token_time = now
        else:
            metrics.inter_token_latencies.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        self.output_token_ids.append(token)
        if logprob is not None:
            self.cumulative_logprob += logprob
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.detokenizer is None or (stop_token and not self.params.include_stop_str_in_output):
            return False
        before = len(self.text)
        self.text += self.detokenizer.step([token])
        # Like stop tokens, stop strings count only once min_tokens tokens are out.
        return len(self.output_token_ids) >= self.params.min_tokens and self._find_stop_string(before)

    def _find_stop_string(self, new_from: int) -> bool:
        """Ends the request at the stop string that the text completes first (ties: the longest),
        looking only at matches that end in the text from new_from on."""
        first = None  # (end, start, stop)
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0 and (first is None or (at + len(stop), at) < first[:2]):
                first = (at + len(stop), at, stop)
        if first is None:
            return False
        end, at, stop = first
        self.text = self.text[: end if self.params.include_stop_str_in_output else at]
        self.finish("stop", stop)
        return True

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.finished:
            return
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.metrics.finished_time = time.monotonic()
        if self.detokenizer is None:
            # a stop token (EOS or stop_token_ids; stop_reason is then its id or None) is not text
            by_token = reason == "stop" and not isinstance(stop_reason, str)
            ids = self.output_token_ids
            if by_token and not self.params.include_stop_str_in_output:
                ids = ids[:-1]
            self.text = self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def visible_text(self) -> str:
        """Text safe to show while running: a tail that may still become a stop string is held back."""
        if self.finished or not self.params.stop:
            return self.text
        hold = max(map(len, self.params.stop)) - 1
        return self.text[: len(self.text) - hold] if hold else self.text

    def output(self) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.visible_text(),
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )
