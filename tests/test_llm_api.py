"""The ProfessionalLLM API on the bundled SmolLM2: inputs, outputs, sampling, stopping, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from helpers import our_last_logits

from professional_nano_llm import LLM, ProfessionalLLM, RequestOutput, SamplingParams
from professional_nano_llm.engine import llm_engine
from professional_nano_llm.engine.request import Request

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return ProfessionalLLM(kv_cache_memory_gb=0.25)


def test_llm_is_an_alias_and_single_prompt_returns_one_output(llm):
    assert LLM is ProfessionalLLM
    out = llm.generate("Hello world", SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert isinstance(out, RequestOutput)
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.stop_reason is None
    assert out["text"] == out.text == out.outputs[0].text and out["token_ids"] == out.token_ids
    assert out.prompt == "Hello world" and out.prompt_token_ids == llm.tokenizer.encode("Hello world")
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.metrics.time_to_first_token > 0 and out.metrics.e2e_latency >= out.metrics.time_to_first_token


def test_prompt_forms_and_input_order(llm):
    params = SamplingParams(max_tokens=6, **GREEDY)
    texts = ["One two three", "The sky is", "Numbers: 1, 2,"]
    by_text = llm.generate(texts, params, use_tqdm=False)
    ids = [llm.tokenizer.encode(t) for t in texts]
    by_ids = llm.generate(ids, params, use_tqdm=False)
    by_dicts = llm.generate([{"prompt_token_ids": ids[0]}, {"prompt": texts[1]}, ids[2]], params, use_tqdm=False)
    single_ids = llm.generate(ids[1], params, use_tqdm=False)
    assert [o.token_ids for o in by_text] == [o.token_ids for o in by_ids] == [o.token_ids for o in by_dicts]
    assert single_ids.token_ids == by_text[1].token_ids
    alone = [llm.generate(t, params, use_tqdm=False).token_ids for t in texts]
    assert alone == [o.token_ids for o in by_text]  # batching changes nothing


def test_per_prompt_sampling_params(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, **GREEDY), SamplingParams(max_tokens=7, **GREEDY)],
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [2, 7]
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Tell me a story", params, use_tqdm=False).token_ids
    again = llm.generate("Tell me a story", params, use_tqdm=False).token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = llm.generate(["Why is the sea", "Tell me a story", "Once"], [others, params, others], use_tqdm=False)
    assert alone == again == batch[1].token_ids
    different_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate("Tell me a story", different_seed, use_tqdm=False).token_ids != alone


def test_stop_strings(llm):
    base = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
    stop = base.text[8:11]
    assert stop and stop in base.text
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, stop=[stop, "zzz-never"], **GREEDY),
                       use_tqdm=False)
    assert out.text == base.text[: base.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, stop=stop, include_stop_str_in_output=True,
                                                           **GREEDY), use_tqdm=False)
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]


def test_the_stop_string_completed_first_wins_and_waits_for_min_tokens(llm):
    tok = llm.tokenizer
    [hello] = tok.encode(" hello")  # one token: both stop strings complete within its text
    request = Request("r", 0, None, tok.encode("Say"), SamplingParams(stop=["llo", "he"]), 0, tok, stream=False)
    assert request.append(hello, None, None) and (request.text, request.stop_reason) == (" ", "he")
    kept = SamplingParams(stop=["llo", "ell"], include_stop_str_in_output=True)
    request = Request("r", 0, None, tok.encode("Say"), kept, 0, tok, stream=False)
    assert request.append(hello, None, None) and (request.text, request.stop_reason) == (" hell", "ell")
    # Before min_tokens no stop string ends a request (as no EOS or stop token does).
    base = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
    early = base.text[:6]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=24, min_tokens=20, stop=[early], **GREEDY),
                       use_tqdm=False)
    assert len(out.token_ids) >= 20 and out.token_ids == base.token_ids[: len(out.token_ids)]


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate("The alphabet: a b c", SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    for stop in ([], ["zzz-never"]):  # decoded once at the end, or token by token for stop strings
        out = llm.generate("The alphabet: a b c", SamplingParams(max_tokens=12, stop_token_ids=[stop_id], stop=stop,
                                                                 **GREEDY), use_tqdm=False)
        assert out.token_ids == base.token_ids[: first + 1]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
        # As in vLLM, the stop token's text is not output unless include_stop_str_in_output.
        assert out.text == llm.tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
        kept = llm.generate("The alphabet: a b c", SamplingParams(max_tokens=12, stop_token_ids=[stop_id], stop=stop,
                                                                  include_stop_str_in_output=True, **GREEDY),
                            use_tqdm=False)
        assert kept.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True) != out.text


def test_eos_text_is_left_out(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=64, skip_special_tokens=False)
    out = llm.chat(messages, params, use_tqdm=False)
    assert out.finish_reason == "stop" and "Paris" in out.text and "<|im_end|>" not in out.text
    assert "".join(llm.stream(messages, params)) == out.text  # token by token, the same
    kept = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64, skip_special_tokens=False,
                                             include_stop_str_in_output=True), use_tqdm=False)
    assert kept.text == out.text + "<|im_end|>"


def test_interleaved_streams_and_generate_all_finish(llm, monkeypatch):
    params = SamplingParams(max_tokens=6, **GREEDY)
    expected = {p: llm.generate(p, params, use_tqdm=False).text for p in ("Hello there", "Good morning", "Once")}
    steps, step = [0], llm.engine.step

    def counted_step():  # a regression would spin here forever: fail instead
        steps[0] += 1
        assert steps[0] < 200, "the engine kept stepping: a stream lost its request's output"
        return step()

    monkeypatch.setattr(llm.engine, "step", counted_step)
    pairs = list(itertools.zip_longest(llm.stream("Hello there", params), llm.stream("Good morning", params)))
    assert "".join(a for a, _ in pairs if a) == expected["Hello there"]
    assert "".join(b for _, b in pairs if b) == expected["Good morning"]
    running = llm.stream("Hello there", params)
    first = next(running)
    assert llm.generate("Once", params, use_tqdm=False).text == expected["Once"]  # runs past the stream's end
    assert first + "".join(running) == expected["Hello there"]
    assert not llm.engine.has_unfinished() and not llm._latest and not llm._waiting


def test_eos_and_min_tokens(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    natural = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in llm.engine.eos_token_ids
    assert len(natural.token_ids) < 30
    forced = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64, min_tokens=40), use_tqdm=False)
    assert len(forced.token_ids) >= 40
    assert not set(forced.token_ids[:39]) & set(llm.engine.eos_token_ids)


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "Say hi"}]
    params = SamplingParams(max_tokens=8, **GREEDY)
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.chat(messages, params, use_tqdm=False).token_ids == llm.generate(list(ids), params, use_tqdm=False).token_ids


def test_stream_yields_the_same_text(llm):
    params = SamplingParams(max_tokens=20, **GREEDY)
    pieces = list(llm.stream("Write a sentence about cats.", params))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("Write a sentence about cats.", params, use_tqdm=False).text
    assert not llm.engine.has_unfinished()


def test_logprobs(llm):
    out = llm.generate("The weather today", SamplingParams(max_tokens=5, logprobs=3, **GREEDY), use_tqdm=False)
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert 3 <= len(entry) <= 4 and token in entry
        assert all(v <= 0 for v in entry.values())
        assert entry[token] == max(entry.values())  # greedy picks the most likely
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature must be a finite number >= 0"),
        (dict(top_p=0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(min_p=2), "min_p must be in"),
        (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
        (dict(presence_penalty=3), "presence_penalty must be in"),
        (dict(frequency_penalty=-2.5), "frequency_penalty must be in"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens must be in"),
        (dict(logprobs=100), "logprobs must be None or in"),
        (dict(stop=[""]), "stop must be non-empty strings"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be non-negative"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    ],
)
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_tiny_temperature_is_greedy_and_stop_ids_are_deduplicated(llm):
    greedy = llm.generate("Hi there", SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    for temperature in (1e-45, 1e-6):  # logits / 1e-45 would overflow float32 and sample garbage
        params = SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True, seed=7, logprobs=1)
        out = llm.generate("Hi there", params, use_tqdm=False)
        assert out.token_ids == greedy.token_ids
    assert SamplingParams(stop_token_ids=[5, 3, 5, 5]).stop_token_ids == [5, 3]


def test_bad_requests_leave_the_engine_usable(llm):
    too_long = [1] * (llm.engine.max_model_len + 5)
    with pytest.raises(ValueError, match=f"max_model_len={llm.engine.max_model_len}"):
        llm.generate([too_long, "fine"], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="must not be empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be integers in"):
        llm.generate([[5, 10**9]], use_tqdm=False)
    with pytest.raises(TypeError, match="unknown engine argument"):
        ProfessionalLLM(no_such_option=1)
    with pytest.raises(ValueError, match="block_size must be a power of two from 8 to 256, got 12"):
        ProfessionalLLM(block_size=12)  # refused before any weight is loaded
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with a 'role' string"):
        llm.chat([{"role": "user", "content": "hi"}, {"rol": "user", "content": "hi"}], use_tqdm=False)
    for content in (None, ["a list", "of parts"]):  # SmolLM2's template joins content as a string
        with pytest.raises(ValueError, match="chat template rejected the messages"):
            llm.chat([{"role": "user", "content": content}], use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert llm.engine.scheduler.stats.num_used_blocks == 0
    assert len(llm.generate("Still works", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False).token_ids) == 3


def test_reset_prefix_cache(llm):
    prompt = "The quick brown fox jumps over the lazy dog. " * 8  # several full 16-token blocks
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = llm.generate(prompt, params, use_tqdm=False)
    cached = llm.generate(prompt, params, use_tqdm=False)
    assert cached.num_cached_tokens >= 16 and cached.token_ids == first.token_ids
    # a stop string ends a request outside the scheduler: its cache hits are still reported
    stopped = llm.generate(prompt, SamplingParams(max_tokens=4, stop=[first.text[1:3]], **GREEDY), use_tqdm=False)
    assert stopped.finish_reason == "stop" and stopped.num_cached_tokens == cached.num_cached_tokens
    assert llm.reset_prefix_cache() is True
    recomputed = llm.generate(prompt, params, use_tqdm=False)
    assert recomputed.num_cached_tokens == 0 and recomputed.token_ids == first.token_ids

    running = llm.stream(prompt, SamplingParams(max_tokens=8, **GREEDY))
    next(running)
    assert llm.reset_prefix_cache() is False  # the streaming request holds its blocks
    running.close()
    assert llm.reset_prefix_cache() is True and llm.engine.scheduler.stats.num_cached_blocks == 0


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProfessionalLLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        ProfessionalLLM(str(tmp_path))


def test_bfloat16_on_cpu(llm):
    """bfloat16 runs end to end and stays close to float32 (not token-exact: bf16 logits tie often)."""
    llm16 = ProfessionalLLM(dtype="bfloat16", kv_cache_memory_gb=0.1)
    assert llm16.engine.runner.kv_cache.dtype == torch.bfloat16
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    fp32, bf16 = our_last_logits(llm, list(prompt)), our_last_logits(llm16, list(prompt))
    assert (bf16 - fp32).abs().max() < 1.0  # logits ~25: a few bf16 roundings
    assert set(bf16.topk(5).indices.tolist()) == set(fp32.topk(5).indices.tolist())
    out = llm16.generate("Paris is the capital of", SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    assert len(out.token_ids) == 8 and out.text.strip()


def test_a_failure_right_after_scheduling_still_closes_the_step(llm, monkeypatch):
    class FailingClock:  # the step's first clock read comes right after schedule()
        @staticmethod
        def monotonic():
            raise RuntimeError("injected clock failure")

    llm.generate("warm", SamplingParams(max_tokens=1), use_tqdm=False)
    request_id = llm.engine.add_request("Hello", SamplingParams(max_tokens=3))
    monkeypatch.setattr(llm_engine, "time", FailingClock)
    with pytest.raises(RuntimeError, match="injected clock failure"):
        llm.engine.step()
    monkeypatch.undo()
    assert request_id not in llm.engine.by_request_id  # aborted with its step
    assert not llm.engine.has_unfinished() and llm.engine.scheduler.stats.num_used_blocks == 0
    assert len(llm.generate("again", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False).token_ids) == 3


def test_a_failing_step_aborts_its_requests_and_the_engine_recovers(llm, monkeypatch):
    def broken_sampler(*args, **kwargs):
        raise RuntimeError("injected sampler failure")

    monkeypatch.setattr(llm.engine, "sampler", broken_sampler)
    with pytest.raises(RuntimeError, match="injected sampler failure"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=3), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished() and llm.engine.scheduler.stats.num_used_blocks == 0
    assert len(llm.generate("again", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False).token_ids) == 3


def test_any_integer_seed_and_checked_stop_ids(llm):
    for seed in (-1, 2**64 + 5):
        out = llm.generate("x", SamplingParams(temperature=1.0, seed=seed, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
        assert len(out.token_ids) == 3
    with pytest.raises(ValueError, match="stop_token_ids must be < the vocabulary size"):
        llm.generate("x", SamplingParams(stop_token_ids=[10**7], min_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished()
