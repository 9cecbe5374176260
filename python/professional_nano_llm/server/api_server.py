"""The OpenAI-compatible HTTP server (`pnl serve`): FastAPI on uvicorn over an AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE), GET /v1/models, POST /tokenize,
POST /detokenize, GET /health (liveness), GET /ready (readiness), GET /metrics (Prometheus).
Every error, whatever raised it, is one envelope: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from professional_nano_llm.config import EngineConfig
from professional_nano_llm.engine.outputs import RequestOutput
from professional_nano_llm.sampling_params import SamplingParams
from professional_nano_llm.server import protocol as P
from professional_nano_llm.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    OutputSink,
    OverloadedError,
    RequestAbortedError,
)
from professional_nano_llm.server.auth import ApiKeys
from professional_nano_llm.server.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("professional_nano_llm.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_SUB_REQUESTS = 1024  # prompts x n in one request
READY_PROBE_TIMEOUT_S = 30.0
DEAD_FLUSH_S = 5.0  # after the engine dies: time for pending responses to go out before exiting
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}
_ERROR_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                413: "request_too_large", 429: "rate_limit_exceeded", 500: "internal_error", 503: "service_unavailable"}


@dataclass
class ServerConfig:
    """Everything `pnl serve` takes (each flag also reads PNL_<FLAG>)."""

    model: str | None = None
    engine_args: dict = field(default_factory=dict)  # EngineConfig fields
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    max_waiting_requests: int | None = None  # admitted requests not yet scheduled; beyond -> 429
    max_waiting_tokens: int | None = None  # their prompt tokens; beyond -> 429
    shutdown_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    log_format: str = "text"  # text | json
    max_body_bytes: int = 4 << 20
    metrics_auth: bool = False  # /metrics needs the API key too
    fault_inject_step: int | None = None  # test hook (PNL_FAULT_INJECT_STEP): engine step N raises

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model or DEFAULT_MODEL_NAME


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or _ERROR_CODES.get(status)
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        info = P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class OpenAIServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_name = config.model_name
        self.keys = ApiKeys(config.api_keys)
        self.engine = AsyncEngine(
            lambda: _load_engine(config),
            max_waiting_requests=config.max_waiting_requests,
            max_waiting_tokens=config.max_waiting_tokens,
            fault_inject_step=config.fault_inject_step,
            on_finished=lambda *a: self.metrics.request_finished(*a),
            on_scheduled=lambda t: self.metrics.request_scheduled(t),
            on_dead=self._engine_died,
        )
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine.snapshot)
        self.draining = False
        self.inflight = 0  # generation requests not yet fully answered
        self.exit_code = 0
        self.server: uvicorn.Server | None = None
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}
        self.app = self._build_app()

    # --- app ---

    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            self.engine.start()
            yield
            await self.engine.stop()

        app = FastAPI(title="Professional nano-vLLM", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/ready", self.ready, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])

        async def api_error(request: Request, exc: APIError):
            return exc.response()

        async def http_error(request: Request, exc: StarletteHTTPException):
            message = f"{exc.detail}: {request.method} {request.url.path}"
            return APIError(exc.status_code, message, headers=exc.headers).response()

        async def validation_error(request: Request, exc: RequestValidationError):
            return _validation_error(exc.errors()).response()

        async def internal_error(request: Request, exc: Exception):
            logger.exception("unhandled error")
            return APIError(500, "internal server error", code="internal_error").response()

        app.add_exception_handler(APIError, api_error)
        app.add_exception_handler(StarletteHTTPException, http_error)
        app.add_exception_handler(RequestValidationError, validation_error)
        app.add_exception_handler(Exception, internal_error)
        return app

    # --- probes and metadata ---

    async def health(self, request: Request) -> Response:
        """Liveness: the process answers and the engine thread is alive (loading counts)."""
        if self.engine.dead is not None or (self.engine.loaded and not self.engine.thread_alive):
            raise APIError(503, f"the engine is not running: {self.engine.dead}", code="engine_dead")
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: loaded, not draining, and a forward pass completed recently (or now, on demand)."""
        self._check_available()
        if not await self.engine.probe(READY_PROBE_TIMEOUT_S):
            raise APIError(503, "the engine did not complete a forward pass", code="not_ready")
        return JSONResponse({"status": "ready"})

    async def prometheus(self, request: Request) -> Response:
        if self.config.metrics_auth:
            self._authorize(request)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        max_len = self.engine.engine.max_model_len if self.engine.loaded else None
        card = P.ModelCard(id=self.model_name, created=self.created, max_model_len=max_len)
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    async def tokenize(self, request: Request) -> Response:
        self._authorize(request)
        self._check_available(draining_ok=True)
        body = await self._read_json(request, P.TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if body.messages is not None:
            ids = (await self._chat_prompt(body.messages, body.add_generation_prompt))[0]
        else:
            ids = (await self._encode([body.prompt]))[0]
        out = P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.engine.engine.max_model_len)
        return JSONResponse(out.model_dump())

    async def detokenize(self, request: Request) -> Response:
        self._authorize(request)
        self._check_available(draining_ok=True)
        body = await self._read_json(request, P.DetokenizeRequest)
        self._check_model(body.model)
        ids = self._check_token_ids(body.tokens, "tokens")
        text = await asyncio.to_thread(self.engine.engine.tokenizer.decode, ids)
        return JSONResponse(P.DetokenizeResponse(prompt=text).model_dump())

    # --- generation ---

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        log = _RequestLog(self, "chatcmpl" if chat else "cmpl")
        subs: list[tuple[str, list[int], SamplingParams]] = []
        handed_off = False  # a streaming response owns the cleanup from then on
        try:
            self._authorize(request)
            self._check_available()
            body = await self._read_json(request, P.ChatCompletionRequest if chat else P.CompletionRequest)
            self._check_model(body.model)
            log.user = body.user
            if body.stream_options is not None and not body.stream:
                raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
            if not 1 <= body.n <= P.MAX_N:
                raise APIError(400, f"n must be in [1, {P.MAX_N}], got {body.n}", param="n")
            num_prompts = 1 if chat else _num_prompts(body.prompt)
            if num_prompts * body.n > MAX_SUB_REQUESTS:  # checked before any prompt is tokenized
                raise APIError(400, f"{num_prompts} prompts x n={body.n} exceeds {MAX_SUB_REQUESTS} completions",
                               param="n")
            prompts = await (self._chat_prompt(body.messages) if chat else self._completion_prompts(body.prompt))
            log.prompt_tokens = sum(map(len, prompts))
            for i, ids in enumerate(prompts):
                for j, params in enumerate(self._sampling_params(body, chat, len(ids))):
                    subs.append((f"{log.id}-{i * body.n + j}", ids, params))
            sink = OutputSink()
            try:
                await self.engine.add(subs, sink, stream=body.stream)
            except OverloadedError as e:
                raise APIError(429, str(e), code="rate_limit_exceeded",
                               headers={"Retry-After": str(e.retry_after)}) from None
            except (EngineNotReadyError, EngineDeadError) as e:
                raise APIError(503, str(e), code="service_unavailable") from None
            except (ValueError, TypeError, OverflowError) as e:
                raise APIError(400, str(e), param=_param_of(str(e))) from None
            run = _Run(self, log, body, chat, prompts, subs, sink)
            if body.stream:
                handed_off = True
                return _SSEResponse(run.stream(), on_close=run.close)
            return await self._complete(request, run)
        except APIError as e:
            log.status = e.status
            return e.response()
        finally:
            if not handed_off:
                self.engine.abort([rid for rid, _, _ in subs])
                log.close()

    async def _complete(self, request: Request, run: _Run) -> Response:
        """Non-streaming: the result, raced against the client going away (then it is aborted)."""
        result = asyncio.ensure_future(run.collect())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
        if not result.done() or result.cancelled():
            run.log.status = 499  # client closed the request; nothing can be sent
            return Response(status_code=499)
        try:
            return JSONResponse(result.result())
        except EngineDeadError as e:
            raise APIError(500, str(e), code="engine_dead") from None
        except RequestAbortedError as e:
            raise APIError(503, str(e), code="shutting_down") from None

    def _sampling_params(self, body, chat: bool, prompt_len: int) -> list[SamplingParams]:
        """The n choices' SamplingParams for one prompt; 400 for what can never run."""
        engine = self.engine.engine
        max_len = engine.max_model_len
        requested, name = body.max_tokens, "max_tokens"
        if chat and body.max_completion_tokens is not None:
            requested, name = body.max_completion_tokens, "max_completion_tokens"
        if requested is not None and requested < 1:
            raise APIError(400, f"{name} must be >= 1, got {requested}", param=name)
        if prompt_len + 1 > max_len:
            raise APIError(400, f"the prompt has {prompt_len} tokens; with one generated token that exceeds "
                                f"this model's maximum context length (max_model_len={max_len})",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        room = max_len - prompt_len
        max_tokens = requested if requested is not None else (room if chat else min(16, room))
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but "
                                f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, "
                                f"{name}={max_tokens}); reduce the prompt or {name}",
                           param=name, code="context_length_exceeded")
        if body.seed is not None and not 0 <= body.seed < (1 << 63) - body.n:
            raise APIError(400, f"seed must be in [0, 2**63 - n), got {body.seed}", param="seed")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > P.MAX_STOP:  # each is searched for after every token, on the engine's thread
            raise APIError(400, f"at most {P.MAX_STOP} stop strings, got {len(stops)}", param="stop")
        if len(set(body.stop_token_ids or [])) > P.MAX_STOP_TOKEN_IDS:
            raise APIError(400, f"at most {P.MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(set(body.stop_token_ids))}",
                           param="stop_token_ids")
        bad = [t for t in body.stop_token_ids or [] if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids must be in [0, {engine.vocab_size}), got {bad[0]}",
                           param="stop_token_ids")
        if chat:
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            logprobs = body.logprobs
        kwargs = dict(max_tokens=max_tokens, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                      stop=body.stop, stop_token_ids=body.stop_token_ids or [], logprobs=logprobs,
                      include_stop_str_in_output=body.include_stop_str_in_output,
                      skip_special_tokens=body.skip_special_tokens)
        for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(body, key) is not None:
                kwargs[key] = getattr(body, key)
        if body.top_k is not None:
            kwargs["top_k"] = min(body.top_k, engine.vocab_size)  # larger is the same filter
        out = []
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            try:
                out.append(SamplingParams(seed=seed, **kwargs))
            except ValueError as e:
                raise APIError(400, str(e), param=_param_of(str(e))) from None
        return out

    # --- request helpers ---

    def _authorize(self, request: Request) -> None:
        if not self.keys.check(request.headers.get("authorization")):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_available(self, draining_ok: bool = False) -> None:
        if self.engine.dead is not None:
            raise APIError(503, f"the engine is not running: {self.engine.dead}", code="engine_dead")
        if self.draining and not draining_ok:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not self.engine.loaded:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def _read_json(self, request: Request, model: type[BaseModel]):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        while True:  # a body over the limit is still read (up to a bound): the client then sees the 413
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise APIError(400, "the client disconnected while sending the body", code="client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            too_large = too_large or size > limit
            if not too_large:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > 4 * limit + (16 << 20):
                break
        if too_large:
            raise APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large",
                           headers={"Connection": "close"})
        try:
            # no NaN/Infinity, no lone surrogates, and nesting too deep is an error here, not a crash later
            data = from_json(b"".join(chunks), allow_inf_nan=False)
        except ValueError as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e.errors(include_url=False)) from None

    async def _encode(self, texts: list[str]) -> list[list[int]]:
        tokenizer = self.engine.engine.tokenizer
        return await asyncio.to_thread(lambda: [list(tokenizer.encode(t)) for t in texts])

    async def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not all(texts):
                raise APIError(400, "prompt must not be empty", param="prompt")
            return await self._encode(texts)
        lists = [prompt] if not prompt or isinstance(prompt[0], int) else prompt
        if not all(lists):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [self._check_token_ids(ids, "prompt") for ids in lists]

    async def _chat_prompt(self, messages: list[P.ChatMessage], add_generation_prompt: bool = True):
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        tokenizer = self.engine.engine.tokenizer
        try:
            ids = await asyncio.to_thread(
                tokenizer.apply_chat_template, conversation, add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False,
            )
        except Exception as e:  # noqa: BLE001 - the template refused the conversation
            raise APIError(400, f"the chat template failed: {e}", param="messages") from None
        return [list(ids)] if not isinstance(ids, dict) else [list(ids["input_ids"])]

    def _check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.engine.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad}", param=param)
        return ids

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.engine.engine.tokenizer.decode([token_id])
        return text

    # --- lifecycle ---

    def _engine_died(self, error: BaseException) -> None:
        """On the event loop: pending requests already got their errors; exit 1 once they are sent."""
        self.exit_code = 1
        asyncio.ensure_future(self._exit_when_flushed(DEAD_FLUSH_S))

    async def _exit_when_flushed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        logger.error("the engine is not running; exiting with status %d", self.exit_code)
        _hard_exit_later(self.exit_code, 15.0)  # whatever happens, never hang
        if self.server is not None:
            self.server.should_exit = True

    def on_signal(self, sig: int) -> None:
        if self.draining:  # a second signal: stop waiting
            logger.warning("%s again: aborting %d request(s) now", signal.Signals(sig).name, self.engine.num_requests)
            self.engine.abort_all(RequestAbortedError("the server is shutting down"))
            if self.server is not None:
                self.server.should_exit = True
                self.server.force_exit = True
            return
        asyncio.ensure_future(self._drain(signal.Signals(sig).name))

    async def _drain(self, why: str) -> None:
        """Refuse new requests (503, /ready 503), let in-flight ones finish, abort the rest, exit."""
        self.draining = True
        timeout = self.config.shutdown_timeout
        logger.info("%s: draining %d request(s) for up to %.0f s", why, self.inflight, timeout)
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            logger.warning("shutdown timeout: aborting %d request(s)", self.engine.num_requests)
            self.engine.abort_all(RequestAbortedError("the server is shutting down"))
            deadline = time.monotonic() + 2.0
            while self.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        if self.server is not None:
            self.server.should_exit = True


class _Run:
    """One generation request in flight: its sub-requests (prompts x n) and their outputs."""

    def __init__(self, server: OpenAIServer, log: _RequestLog, body, chat: bool, prompts: list[list[int]],
                 subs: list[tuple[str, list[int], SamplingParams]], sink: OutputSink):
        self.server, self.log, self.body, self.chat, self.sink = server, log, body, chat, sink
        self.prompts = prompts
        self.choices = {rid: _Choice(index) for index, (rid, _, _) in enumerate(subs)}
        self.top_n = (body.top_logprobs or 0) if chat else None
        self.created = int(time.time())

    async def updates(self) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        pending = len(self.choices)
        while pending:
            for out in await self.sink.get():
                choice = self.choices[out.request_id]
                choice.output = out
                self.log.update(out)
                if out.finished:
                    pending -= 1
                yield choice, out

    async def collect(self) -> dict:
        async for _ in self.updates():
            pass
        choices = []
        for c in self.choices.values():
            out = c.output
            logprobs = self._logprobs(c, out.token_ids, out.logprobs) if out.logprobs is not None else None
            common = dict(index=c.index, logprobs=logprobs, finish_reason=out.finish_reason,
                          stop_reason=out.stop_reason)
            if self.chat:
                choices.append(P.ChatChoice(message=P.ChatResponseMessage(content=out.text), **common))
            else:
                choices.append(P.CompletionChoice(text=out.text, **common))
        cls = P.ChatCompletionResponse if self.chat else P.CompletionResponse
        self.log.status = 200
        return cls(id=self.log.id, created=self.created, model=self.server.model_name, choices=choices,
                   usage=self.usage()).model_dump()

    async def stream(self) -> AsyncIterator[str]:
        """SSE frames: `data: {json}` + blank line each; `data: [DONE]` last, also after an error frame."""
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            if self.chat:  # the role comes first, before any text
                for c in self.choices.values():
                    yield self._frame([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], include_usage)
            async for c, out in self.updates():
                text = out.text[c.num_chars:]
                new_ids = out.token_ids[c.num_tokens:]
                new_lps = out.logprobs[c.num_tokens:] if out.logprobs is not None else None
                c.num_chars, c.num_tokens = len(out.text), len(out.token_ids)
                if not text and not out.finished and not (new_lps and new_ids):
                    continue  # e.g. half a UTF-8 character: nothing to show yet
                logprobs = self._logprobs(c, new_ids, new_lps) if new_lps is not None else None
                choice = {"index": c.index}
                if self.chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                choice.update(logprobs=logprobs, finish_reason=out.finish_reason)
                if out.finished:
                    choice["stop_reason"] = out.stop_reason
                yield self._frame([choice], include_usage)
            if include_usage:
                yield self._frame([], include_usage, self.usage().model_dump())
            self.log.status = 200
        except (EngineDeadError, RequestAbortedError) as e:
            status, code = (500, "engine_dead") if isinstance(e, EngineDeadError) else (503, "shutting_down")
            self.log.status = status
            yield f"data: {json.dumps(APIError(status, str(e), code=code).body(), separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    def close(self) -> None:
        """After the stream ends, however it ends: abort what still runs, log, stop counting it."""
        self.server.engine.abort(list(self.choices))
        if self.log.status == 200 and any(c.output is None or not c.output.finished for c in self.choices.values()):
            self.log.status = 499
        self.log.close()

    def _frame(self, choices: list[dict], include_usage: bool, usage: dict | None = None) -> str:
        chunk = {"id": self.log.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.server.model_name, "choices": choices}
        if include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def usage(self) -> P.Usage:
        outs = [c.output for c in self.choices.values() if c.output is not None]
        completion = sum(len(o.token_ids) for o in outs)
        prompt = sum(map(len, self.prompts))
        n = self.body.n
        cached = sum(o.num_cached_tokens for c, o in zip(self.choices.values(), outs) if c.index % n == 0)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))

    def _logprobs(self, c: _Choice, ids: list[int], entries: list[dict[int, float]]) -> dict:
        text_of = self.server.token_text
        if self.chat:
            content = []
            for tid, entry in zip(ids, entries):
                top = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_n]
                content.append({**_chat_token(text_of(tid), entry.get(tid)),
                                "top_logprobs": [_chat_token(text_of(t), v) for t, v in top]})
            return {"content": content}
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(ids, entries):
            text = text_of(tid)
            result["tokens"].append(text)
            result["token_logprobs"].append(_finite(entry.get(tid)))
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])
            result["top_logprobs"].append({text_of(t): _finite(v) for t, v in ranked})
            result["text_offset"].append(c.text_offset)
            c.text_offset += len(text)
        return result


@dataclass
class _Choice:
    index: int
    output: RequestOutput | None = None
    num_chars: int = 0  # streamed so far
    num_tokens: int = 0
    text_offset: int = 0  # completions logprobs


class _RequestLog:
    """One log line per generation request (never its prompt or output), and the in-flight count."""

    def __init__(self, server: OpenAIServer, prefix: str):
        self.server = server
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.start = time.monotonic()
        self.status = 500
        self.prompt_tokens = 0
        self.user: str | None = None  # the client's end-user id (OpenAI `user`), for abuse tracing
        self.first_token_time: float | None = None
        self._tokens: dict[str, int] = {}  # per engine request, latest
        self._finish: dict[str, str] = {}
        self.closed = False
        server.inflight += 1

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    def update(self, out: RequestOutput) -> None:
        self._tokens[out.request_id] = len(out.token_ids)
        if out.finished:
            self._finish[out.request_id] = out.finish_reason
        t = out.metrics.first_token_time if out.metrics else None
        if t is not None and (self.first_token_time is None or t < self.first_token_time):
            self.first_token_time = t

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.inflight -= 1
        e2e = time.monotonic() - self.start
        ttft = None if self.first_token_time is None else max(0.0, self.first_token_time - self.start)
        fields = {"request_id": self.id, "status": self.status, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens, "ttft_s": None if ttft is None else round(ttft, 4),
                  "e2e_s": round(e2e, 4), "finish_reason": ",".join(sorted(set(self._finish.values()))) or None,
                  "user": self.user}
        ttft_text = "-" if ttft is None else f"{ttft:.3f}s"
        logger.info("request %s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s e2e=%.3fs finish=%s user=%s",
                    self.id, self.status, self.prompt_tokens, self.completion_tokens, ttft_text, e2e,
                    fields["finish_reason"] or "-", _loggable(self.user or "-"), extra={"fields": fields})


class _SSEResponse(StreamingResponse):
    """text/event-stream whose generator is closed and cleanup run however the response ends
    (Starlette cancels the stream when the client disconnects)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._on_close()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _chat_token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else -9999.0  # JSON has no -inf (vLLM's stand-in)


_PARAMS = set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields)


def _param_of(message: str) -> str | None:
    """The request field a SamplingParams / engine message names first ("top_p must be in ...")."""
    word = message.split(" ", 1)[0]
    return word if word in _PARAMS else None


def _validation_error(errors: list[dict]) -> APIError:
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # drop pydantic's union-member tags ("str", "list[int]", "TextPart") from the location
    loc = [p for p in loc if not ("[" in p or p in ("str", "int", "float", "bool") or p[:1].isupper())]
    where = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        message = f"unknown field '{where}'"
    elif not loc and err.get("type") == "model_type":
        message = "the request body must be a JSON object"
    else:
        message = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    return APIError(400, message, param=loc[0] if loc else None, code="invalid_value")


def _load_engine(config: ServerConfig):
    from professional_nano_llm.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig.from_kwargs(config.model, dict(config.engine_args)))


def _hard_exit_later(code: int, seconds: float) -> None:
    timer = threading.Timer(seconds, lambda: os._exit(code))
    timer.daemon = True
    timer.start()


# --- logging and the process ---


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str) -> None:
    pkg = logging.getLogger("professional_nano_llm")  # configured on import (stderr, PNL_LOG_LEVEL)
    if log_format == "json":
        for handler in pkg.handlers:
            handler.setFormatter(JsonFormatter())
    uv = logging.getLogger("uvicorn")
    uv.handlers = list(pkg.handlers)
    uv.setLevel(pkg.level)  # PNL_LOG_LEVEL for uvicorn's lines too
    uv.propagate = False


class _UvicornServer(uvicorn.Server):
    """uvicorn.Server whose SIGINT/SIGTERM start our drain instead of its own shutdown (and are not
    re-raised at exit, so a drained server exits 0)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None]):
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def run_server(config: ServerConfig) -> int:
    """Runs until SIGTERM/SIGINT (exit 0 after draining) or an engine failure (exit 1)."""
    setup_logging(config.log_format)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                       config.host)
    server = OpenAIServer(config)
    uv_config = uvicorn.Config(server.app, host=config.host, port=config.port, log_config=None, access_log=False,
                               lifespan="on", timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server.server = _UvicornServer(uv_config, server.on_signal)
    logger.info("serving %s on http://%s:%d (model loading in the background; GET /ready says when)",
                config.model_name, config.host, config.port)
    try:
        asyncio.run(server.server.serve())
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        return e.code if isinstance(e.code, int) else 1
    return server.exit_code


def _num_prompts(prompt) -> int:
    """How many prompts a completions `prompt` holds: one string or token list, else a list of them."""
    return 1 if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)


def _loggable(text: str) -> str:
    """Client text for a one-line log: control characters and non-ASCII escaped, so a newline in it
    cannot forge a log line."""
    return text.encode("unicode_escape").decode("ascii")
