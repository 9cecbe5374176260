"""The engine loop: C++ scheduler -> model runner -> sampler -> C++ postprocess -> request outputs."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from professional_nano_llm.config import EngineConfig
from professional_nano_llm.engine import ScheduleOutput, Scheduler, SchedulerConfig, StopParams
from professional_nano_llm.engine.batch import StepStaging
from professional_nano_llm.engine.model_runner import ModelRunner, kv_bytes_per_block, kv_cache_budget
from professional_nano_llm.engine.outputs import RequestOutput
from professional_nano_llm.engine.request import Request
from professional_nano_llm.engine.sampler import LogprobRows, Sampler, SamplerOutput, sampling_batch
from professional_nano_llm.loader import resolve_model
from professional_nano_llm.models import build_model, model_config
from professional_nano_llm.sampling_params import SamplingParams
from professional_nano_llm.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger("professional_nano_llm")


@dataclass
class StepStats:
    num_prefill_tokens: int = 0  # tokens of sequences with more than one new token
    num_decode_tokens: int = 0
    num_preemptions: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        source = resolve_model(config.model)
        self.model_config = cfg = model_config(source.hf_config)
        self.tokenizer = load_tokenizer(source)
        self.eos_token_ids = eos_token_ids(source, self.tokenizer)
        self.vocab_size = cfg.vocab_size

        bytes_per_block = kv_bytes_per_block(cfg, config.block_size, config.torch_dtype)
        model = build_model(cfg, cfg.max_position_embeddings, config.torch_dtype, config.torch_device)
        model.load_weights(source.tensors())
        model.prepack()
        num_blocks = kv_cache_budget(config, cfg) // bytes_per_block
        capacity = num_blocks * config.block_size
        max_model_len = config.max_model_len or min(cfg.max_position_embeddings, capacity)
        if num_blocks < 1 or max_model_len > capacity:
            raise ValueError(
                f"the KV cache holds {max(capacity, 0)} tokens ({max(num_blocks, 0)} blocks of {config.block_size}) "
                f"but max_model_len is {max_model_len}: lower max_model_len or give the cache more memory "
                "(kv_cache_memory_gb on CPU, gpu_memory_utilization on GPU)"
            )
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's context ({cfg.max_position_embeddings} tokens)"
            )
        self.max_model_len = max_model_len
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB); max_model_len %d",
                    num_blocks, config.block_size, capacity, num_blocks * bytes_per_block / (1 << 30), max_model_len)
        self.runner = ModelRunner(model, config, num_blocks, max_model_len)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
        ))
        self.sampler = Sampler()
        self.param_staging = StepStaging(config.torch_device, torch.int64) if self.runner.staging is not None else None
        self.requests: dict[int, Request] = {}  # by sequence id
        self.by_request_id: dict[str, Request] = {}
        self.seed_rng = np.random.default_rng(config.seed)
        self.request_counter = itertools.count()
        self.last_step = StepStats()
        # Overlapped steps where the host's work is worth hiding: behind a GPU.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else config.torch_device.type == "cuda")
        self._pending: collections.deque[_Launched] = collections.deque()  # launched, not finished; oldest first
        self._lockstep_requests = 0  # live requests with penalties

    # --- requests ---

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        bad = next((t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad!r}")
        return [int(t) for t in ids]

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = False,
    ) -> str:
        """Queues a prompt (text or token ids). Raises ValueError for a request that can never run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else str(next(self.request_counter))
        if request_id in self.by_request_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.tokenize(prompt)
        bad_stop = next((t for t in params.stop_token_ids if t >= self.vocab_size), None)
        if bad_stop is not None:
            raise ValueError(f"stop_token_ids must be < the vocabulary size {self.vocab_size}, got {bad_stop}")
        seq_id = self.scheduler.add(prompt_ids, StopParams(
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            ignore_eos=params.ignore_eos,
            stop_token_ids=params.stop_token_ids,
            eos_token_ids=self.eos_token_ids,
        ))
        seed = params.seed if params.seed is not None else int(self.seed_rng.integers(1 << 63))
        request = Request(request_id, seq_id, prompt if isinstance(prompt, str) else None, prompt_ids, params,
                          seed, self.tokenizer, stream)
        if params.has_penalties:
            request.output_counts = torch.zeros(self.vocab_size, dtype=torch.float32)
            self._lockstep_requests += 1
        self.requests[seq_id] = request
        self.by_request_id[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> bool:
        request = self.by_request_id.get(request_id)
        if request is None:
            return False
        self.scheduler.abort(request.seq_id)
        request.finish("abort")
        self._forget(request)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix, so later prompts recompute their KV. Refused (False, with a
        warning) while requests are running: their blocks may be shared or about to be cached."""
        if self.scheduler.reset_prefix_cache():
            return True
        logger.warning("reset_prefix_cache: %d request(s) still hold KV blocks; nothing was reset",
                       self.scheduler.num_running)
        return False

    # --- the loop ---

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of requests that finished or, when streaming, grew.

        With async scheduling, the next step is planned and queued on the device before this one's
        tokens are read: the host's work on them (detokenizing, stop strings, outputs) runs while
        the device computes, and the next step reads this one's tokens on the device. Requests
        with penalties need every earlier token on the host, so while one runs, steps run in
        lockstep.
        """
        if not self._pending:
            self._launch()
        if self.async_scheduling and self.scheduler.has_unfinished and self._lockstep_requests == 0:
            self._launch()
        return self._finish()

    def _launch(self) -> None:
        """Schedules a step and queues its model run and sampling (on the CPU: runs them)."""
        out = self.scheduler.schedule()
        launched = _Launched(out, [], None)
        self._pending.append(launched)
        try:  # from here on, a failure must still close the step (postprocess), or the engine is stuck
            nd = out.num_decode_seqs
            self.last_step = StepStats(out.num_tokens - nd, nd, len(out.preempted_seq_ids))
            for seq_id in out.preempted_seq_ids:
                self.requests[seq_id].metrics.num_preemptions += 1
            now = time.monotonic()
            for seq_id in out.seq_ids.tolist():
                metrics = self.requests[seq_id].metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
            previous = self._pending[-2].result if out.num_placeholders else None
            logits = self.runner.run(out, previous.tokens if previous is not None else None)
            if logits is None:
                return
            requests = [self.requests[s] for s in out.sampled_seq_ids.tolist()]
            batch = sampling_batch(requests, self.vocab_size, self.eos_token_ids, self.runner.device,
                                   self.param_staging)
            launched.requests, launched.result = requests, self.sampler(logits, batch)
            for request in requests:
                request.num_sampled += 1
        except BaseException:
            self._fail_pending()
            raise

    def _finish(self) -> list[RequestOutput]:
        """Reads the oldest pending step's tokens and hands them to the scheduler and the requests."""
        launched = self._pending[0]
        result = launched.result
        try:
            tokens = result.tokens.cpu() if result is not None else torch.empty(0, dtype=torch.int64)
            token_list = tokens.tolist()
            logprobs = LogprobRows(result, token_list) if result is not None else None
        except BaseException:
            self._fail_pending()
            raise
        self._pending.popleft()
        finished = self.scheduler.postprocess(tokens.numpy())
        stopped_by_token = {f.id for f in finished if f.reason == "stop"}

        updated: list[Request] = []
        for i, request in enumerate(launched.requests):
            if request.finished:  # a stop string ended it while this step ran: its token is dropped
                continue
            stop_token = request.seq_id in stopped_by_token
            if request.append(token_list[i], *logprobs.row(i, request.params.logprobs), stop_token):
                # A stop string ended it: the scheduler takes it back and reports its cache hits
                # (unless this token also ended it there: then `finished` reports them).
                ended = self.scheduler.finish(request.seq_id, "stop")
                if ended is not None:
                    request.num_cached_tokens = ended.num_cached_tokens
            if request.output_counts is not None:
                request.output_counts[token_list[i]] += 1
            if request.detokenizer is not None or request.finished:
                updated.append(request)
        for f in finished:
            request = self.requests[f.id]
            request.num_cached_tokens = f.num_cached_tokens
            request.finish(f.reason, f.stop_token)
            if request.detokenizer is None:
                updated.append(request)
        outputs = []
        for request in dict.fromkeys(updated):
            outputs.append(request.output())
            if request.finished:
                self._forget(request)
        return outputs

    def _fail_pending(self) -> None:
        """The model, the sampler or a request's bookkeeping failed: the requests of every pending
        step end as aborted and each step is closed, so the engine stays usable."""
        for launched in self._pending:
            for seq_id in launched.out.seq_ids.tolist():
                self.scheduler.abort(seq_id)
                request = self.requests.get(seq_id)  # None: the failure was a request gone missing
                if request is not None:
                    request.finish("abort")
                    self._forget(request)
        while self._pending:
            self.scheduler.postprocess(np.zeros(self._pending.popleft().out.num_sampled, dtype=np.int32))

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.seq_id, None)
        self.by_request_id.pop(request.request_id, None)
        if request.params.has_penalties:
            self._lockstep_requests -= 1


@dataclass
class _Launched:
    """A scheduled step whose model run and sampling are queued: its output (valid until the
    schedule() after next), the requests of its sampled rows, and the sampler's tokens on the device
    (None when it samples nothing)."""

    out: ScheduleOutput
    requests: list[Request]
    result: SamplerOutput | None
