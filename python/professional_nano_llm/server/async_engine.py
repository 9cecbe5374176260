"""AsyncEngine: the LLMEngine on one dedicated thread, driven from an asyncio event loop.

Every engine call (load, add, abort, step) happens on the engine thread; the event loop sends it
commands through a thread-safe queue and gets each step's outputs back with one
loop.call_soon_threadsafe per step. The thread blocks on the command queue when there is no work.
Requests share the engine's continuous batching. An exception in a step kills the loop: every
pending request then gets EngineDeadError and on_dead is called on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from professional_nano_llm.engine.llm_engine import LLMEngine
from professional_nano_llm.engine.outputs import RequestMetrics, RequestOutput
from professional_nano_llm.sampling_params import SamplingParams

logger = logging.getLogger("professional_nano_llm.server")

PROBE_PREFIX = "probe-"  # internal readiness probes: not admitted, counted or logged as requests
RECENT_STEP_S = 10.0  # /ready trusts a forward pass this recent without probing


class EngineDeadError(RuntimeError):
    """The engine loop died (or its model failed to load); no request can run."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class RequestAbortedError(RuntimeError):
    """The server aborted the request (shutdown timeout)."""


class OverloadedError(RuntimeError):
    """Admission control refused the request; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class EngineSnapshot:
    """Scheduler counters, published by the engine thread after every step and command batch."""

    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_blocks: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_preemptions: int = 0


class OutputSink:
    """Where the outputs of one client request's engine requests land (event loop only).

    Only the latest output of each engine request is kept: every output carries all text and tokens so
    far, so a consumer that skips one loses nothing, and a slow reader never piles outputs up.
    """

    def __init__(self):
        self._latest: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._latest[output.request_id] = output
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = self._error or error
        self._event.set()

    async def get(self) -> list[RequestOutput]:
        """The outputs that arrived since the last call (waits for one); raises the error that ended them."""
        await self._event.wait()
        self._event.clear()
        if self._error is not None:
            raise self._error
        outputs = list(self._latest.values())
        self._latest.clear()
        return outputs


# on_finished(request_id, num_prompt_tokens, num_generated_tokens, finish_reason, metrics), engine thread
FinishedHook = Callable[[str, int, int, str, RequestMetrics], None]


class AsyncEngine:
    def __init__(
        self,
        make_engine: Callable[[], LLMEngine],
        *,
        max_waiting_requests: int | None = None,
        max_waiting_tokens: int | None = None,
        fault_inject_step: int | None = None,
        on_finished: FinishedHook | None = None,
        on_scheduled: Callable[[float], None] | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
    ):
        self._make_engine = make_engine
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self._fault_inject_step = fault_inject_step
        self._on_finished, self._on_scheduled, self._on_dead = on_finished, on_scheduled, on_dead
        self.engine: LLMEngine | None = None  # set by the engine thread once the model is loaded
        self.loaded = False
        self.dead: BaseException | None = None  # set on the event loop
        self.snapshot = EngineSnapshot()
        self.last_step_time = 0.0  # time.monotonic() of the last completed step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}  # event loop only: request id -> where its outputs go
        self._lock = threading.Lock()  # guards the admission counters below
        self._waiting: dict[str, int] = {}  # admitted, not yet scheduled: request id -> prompt tokens
        self._waiting_tokens = 0
        self._unscheduled: set[str] = set()  # engine thread only: added, never scheduled yet
        self._probe: asyncio.Future | None = None
        self._probe_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- event loop side ---

    def start(self) -> None:
        """Starts the engine thread, which loads the model and then runs the step loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pnl-engine", daemon=True)
        self._thread.start()

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting_admitted(self) -> tuple[int, int]:
        with self._lock:
            return len(self._waiting), self._waiting_tokens

    async def add(
        self,
        requests: list[tuple[str, list[int], SamplingParams]],
        sink: OutputSink,
        stream: bool,
    ) -> None:
        """Admits and adds (request id, prompt ids, params) requests whose outputs go to `sink`.

        Raises OverloadedError beyond the waiting limits, EngineNotReadyError / EngineDeadError,
        or the engine's ValueError for a request that can never run (none of them is then left).
        With stream=True every step that adds text updates the sink, else only the finished output.
        """
        self._check_running()
        self._admit([(rid, len(ids)) for rid, ids, _ in requests])
        acks = []
        for rid, ids, params in requests:
            ack = self._loop.create_future()
            self._sinks[rid] = sink
            self._commands.put(("add", rid, ids, params, stream, ack))
            acks.append(ack)
        try:
            results = await asyncio.gather(*acks, return_exceptions=True)
        except BaseException:  # cancelled (client gone): whatever was added is aborted
            self.abort([rid for rid, _, _ in requests])
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.abort([rid for rid, _, _ in requests])
            raise errors[0]

    def abort(self, request_ids: list[str]) -> None:
        """Aborts requests still running (their KV blocks are freed at the engine's next turn)."""
        for rid in request_ids:
            if self._sinks.pop(rid, None) is not None:
                self._commands.put(("abort", rid))

    def abort_all(self, error: BaseException) -> None:
        """Ends every running request with `error` (put in its sink) and aborts it in the engine."""
        for rid, sink in list(self._sinks.items()):
            sink.fail(error)
            self.abort([rid])

    @property
    def num_requests(self) -> int:
        return len(self._sinks)

    async def probe(self, timeout: float) -> bool:
        """True when the engine completed a forward pass recently, or completes one now."""
        if self.dead is not None or not self.loaded:
            return False
        if time.monotonic() - self.last_step_time < RECENT_STEP_S:
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe())
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        except (asyncio.TimeoutError, Exception):
            return False

    async def _run_probe(self) -> bool:
        rid = f"{PROBE_PREFIX}{next(self._probe_ids)}"
        sink = OutputSink()
        token = self.engine.tokenizer.bos_token_id or 0
        try:
            await self.add([(rid, [token], SamplingParams(temperature=0, max_tokens=1))], sink, stream=False)
            while not any(out.finished for out in await sink.get()):
                pass
            return True
        finally:
            self.abort([rid])

    async def stop(self, timeout: float = 5.0) -> None:
        """Stops the engine thread (the requests still in it are dropped)."""
        self._commands.put(("stop",))
        if self._thread is not None and self.loaded:  # a load cannot be interrupted; the thread is a daemon
            await asyncio.to_thread(self._thread.join, timeout)

    def _check_running(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine is not running: {self.dead}")
        if not self.loaded:
            raise EngineNotReadyError("the model is still loading")

    def _admit(self, items: list[tuple[str, int]]) -> None:
        """Reserves waiting slots; an idle queue always admits, so any single request can run."""
        if all(rid.startswith(PROBE_PREFIX) for rid, _ in items):
            return
        with self._lock:
            count, tokens = len(self._waiting), self._waiting_tokens
            new_tokens = sum(t for _, t in items)
            limit = self.max_waiting_requests
            if limit is not None and count and count + len(items) > limit:
                raise OverloadedError(f"too many requests waiting ({count}; the limit is {limit}); retry later")
            limit = self.max_waiting_tokens
            if limit is not None and tokens and tokens + new_tokens > limit:
                raise OverloadedError(
                    f"too many prompt tokens waiting ({tokens} + {new_tokens}; the limit is {limit}); retry later"
                )
            for rid, t in items:
                self._waiting[rid] = t
                self._waiting_tokens += t

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            sink.put(out)
            if out.finished:
                del self._sinks[out.request_id]

    def _died(self, error: BaseException) -> None:
        if self.dead is not None:
            return
        self.dead = error
        dead = EngineDeadError(f"the engine loop died: {error}")
        for sink in self._sinks.values():
            sink.fail(dead)
        self._sinks.clear()
        while True:  # commands the engine thread will never see
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add" and not cmd[-1].done():
                cmd[-1].set_exception(dead)
        if self._on_dead is not None:
            self._on_dead(error)

    # --- engine thread ---

    def _call_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
            self.loaded = True
            self._publish()
            self._loop_forever()
        except BaseException as e:  # noqa: BLE001 - any failure ends the engine
            if not self.loaded and isinstance(e, (FileNotFoundError, ValueError, TypeError)):
                logger.error("the model failed to load: %s", e)  # a user error: no traceback
            else:
                logger.exception("the engine loop died" if self.loaded else "the model failed to load")
            self._call_loop(self._died, e)

    def _loop_forever(self) -> None:
        engine, commands, steps = self.engine, self._commands, 0
        while True:
            batch = [] if engine.has_unfinished() else [commands.get()]  # idle: block, no spinning
            while True:
                try:
                    batch.append(commands.get_nowait())
                except queue.Empty:
                    break
            for cmd in batch:
                if cmd[0] == "stop":
                    return
                if cmd[0] == "add":
                    self._add(*cmd[1:])
                else:
                    self._abort(cmd[1])
            if engine.has_unfinished():
                steps += 1
                if steps == self._fault_inject_step:
                    raise RuntimeError(f"PNL_FAULT_INJECT_STEP: injected failure in engine step {steps}")
                outputs = engine.step()
                self.last_step_time = time.monotonic()
                self._after_step(outputs)
                if outputs:
                    self._call_loop(self._deliver, outputs)
            self._publish()

    def _add(self, rid: str, ids: list[int], params: SamplingParams, stream: bool, ack: asyncio.Future) -> None:
        try:
            self.engine.add_request(ids, params, request_id=rid, stream=stream)
        except Exception as e:  # noqa: BLE001 - a request error, raised before anything was queued
            self._release(rid)
            self._call_loop(_resolve, ack, e)
            return
        self._unscheduled.add(rid)
        self._call_loop(_resolve, ack, None)

    def _abort(self, rid: str) -> None:
        request = self.engine.by_request_id.get(rid)
        if request is None or not self.engine.abort_request(rid):
            return
        self._unscheduled.discard(rid)
        self._release(rid)
        self._finished(rid, len(request.prompt_token_ids), len(request.output_token_ids), "abort", request.metrics)

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._scheduled(out.request_id, out.metrics)
                self._finished(out.request_id, len(out.prompt_token_ids), len(out.token_ids), out.finish_reason,
                               out.metrics)
        for rid in list(self._unscheduled):
            request = self.engine.by_request_id.get(rid)
            if request is not None and request.metrics.first_scheduled_time is not None:
                self._scheduled(rid, request.metrics)

    def _scheduled(self, rid: str, metrics: RequestMetrics) -> None:
        if rid not in self._unscheduled:
            return
        self._unscheduled.discard(rid)
        self._release(rid)
        if self._on_scheduled is not None and not rid.startswith(PROBE_PREFIX) and metrics.queue_time is not None:
            self._on_scheduled(metrics.queue_time)

    def _finished(self, rid: str, num_prompt: int, num_generated: int, reason: str, metrics: RequestMetrics) -> None:
        if self._on_finished is not None and not rid.startswith(PROBE_PREFIX):
            try:
                self._on_finished(rid, num_prompt, num_generated, reason, metrics)
            except Exception:  # noqa: BLE001 - bookkeeping must never kill the engine
                logger.exception("request bookkeeping failed")

    def _release(self, rid: str) -> None:
        with self._lock:
            tokens = self._waiting.pop(rid, None)
            if tokens is not None:
                self._waiting_tokens -= tokens

    def _publish(self) -> None:
        s = self.engine.scheduler
        stats = s.stats
        self.snapshot = EngineSnapshot(
            num_running=s.num_running, num_waiting=s.num_waiting, num_used_blocks=stats.num_used_blocks,
            num_blocks=stats.num_blocks, prefix_queries=stats.prefix_queries, prefix_hits=stats.prefix_hits,
            num_preemptions=s.num_preemptions,
        )


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
