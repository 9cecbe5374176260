"""ProfessionalLLM: the offline Python API (vLLM's LLM / nano-vLLM's LLM, same calls)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from jinja2 import TemplateError
from tqdm.auto import tqdm

from professional_nano_llm.config import EngineConfig
from professional_nano_llm.engine.llm_engine import LLMEngine
from professional_nano_llm.engine.outputs import RequestOutput
from professional_nano_llm.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class ProfessionalLLM:
    """An engine in this process. `model` is a Hugging Face folder, a .gguf file or a hub id;
    None loads the bundled SmolLM2-135M-Instruct. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, engine_args))
        # Open streams and generate() calls share the engine: whichever steps it files every
        # output here for its owner, so a suspended stream misses nothing (not even its finish).
        self._latest: dict[str, RequestOutput] = {}  # request id -> its newest output not yet read
        self._waiting: set[str] = set()  # request ids a stream or generate() call is reading

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Completes one prompt (-> RequestOutput) or a list of them (-> list, in input order).

        A prompt is a string, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...}.
        """
        single = _is_single_prompt(prompts)
        items = [prompts] if single else list(prompts)
        params = _params_per_prompt(sampling_params, len(items))
        results = self._run(items, params, use_tqdm)
        return results[0] if single else results

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Applies the model's chat template to one conversation (list of {"role", "content"}) or many."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt) for c in conversations]
        results = self._run(prompts, _params_per_prompt(sampling_params, len(prompts)), use_tqdm)
        return results[0] if single else results

    def stream(self, prompt: Prompt | list[dict], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one prompt (or conversation) piece by piece as it is generated."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = self._chat_prompt(prompt, True)
        request_id = self.engine.add_request(_prompt_input(prompt), sampling_params, stream=True)
        self._waiting.add(request_id)
        shown = 0
        try:
            while (out := self._next_output(request_id)) is not None:
                if len(out.text) > shown:
                    yield out.text[shown:]
                    shown = len(out.text)
                if out.finished:
                    return
        finally:
            self._forget(request_id)  # a consumer that stops early frees the request

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prompt prefix (as vLLM's LLM.reset_prefix_cache), e.g. to time
        prefill again. Returns False, resetting nothing, while a request is running."""
        return self.engine.reset_prefix_cache()

    def _chat_prompt(self, conversation: list[dict], add_generation_prompt: bool) -> list[int]:
        if not conversation:
            raise ValueError("messages must not be empty")
        for i, message in enumerate(conversation):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise ValueError(f"messages[{i}] must be a dict with a 'role' string and a 'content', got {message!r}")
        try:
            return list(self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            ))
        except (TemplateError, TypeError) as e:  # the template's own checks, or content it cannot join
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params):
                ids.append(engine.add_request(_prompt_input(prompt), sp))
                self._waiting.add(ids[-1])
            return self._drain(ids, use_tqdm)
        finally:
            for request_id in ids:  # on error or interrupt, nothing is left in the engine
                self._forget(request_id)

    def _drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, pending, done = self.engine, list(ids), {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        with bar:
            while True:
                for request_id in pending:
                    out = self._latest.pop(request_id, None)
                    if out is not None and out.finished:
                        done[request_id] = out
                        bar.update(1)
                    elif request_id not in engine.by_request_id:
                        raise RuntimeError(f"request {request_id!r} was aborted outside generate()")
                pending = [i for i in pending if i not in done]
                if not pending:
                    return [done[i] for i in ids]
                start = time.perf_counter()
                self._step()
                seconds = time.perf_counter() - start
                stats = engine.last_step
                if stats.num_prefill_tokens:
                    prefill_tps = stats.num_prefill_tokens / seconds
                if stats.num_decode_tokens:
                    decode_tps = stats.num_decode_tokens / seconds
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)

    def _step(self) -> None:
        """One engine step; files the outputs of the requests someone here is reading."""
        for out in self.engine.step():
            if out.request_id in self._waiting:
                self._latest[out.request_id] = out

    def _next_output(self, request_id: str) -> RequestOutput | None:
        """The request's newest output, stepping the engine until there is one; None once the
        request is gone without one (aborted from outside)."""
        while (out := self._latest.pop(request_id, None)) is None:
            if request_id not in self.engine.by_request_id:
                return None
            self._step()
        return out

    def _forget(self, request_id: str) -> None:
        self._waiting.discard(request_id)
        self._latest.pop(request_id, None)
        self.engine.abort_request(request_id)


LLM = ProfessionalLLM


def _is_single_prompt(prompts) -> bool:
    """A string, a prompt dict, or one list of token ids (not a list of prompts)."""
    if isinstance(prompts, (str, dict)):
        return True
    return isinstance(prompts, (list, tuple)) and bool(prompts) and all(isinstance(t, int) for t in prompts)


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (str, list, tuple)):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt if isinstance(prompt, str) else list(prompt)
    raise TypeError(f"a prompt is a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _params_per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
