"""Async scheduling (each step planned while the one before runs) against lockstep, on the bundled
SmolLM2: the same tokens, text, finish reasons and logprobs, through preemption, chunked prefill,
prefix caching, stop tokens and strings, min_tokens, seeds and aborts, and no KV block left over."""

from __future__ import annotations

import pytest

from professional_nano_llm import ProfessionalLLM, SamplingParams

# A small cache (14 blocks of 16 tokens) and token budget: the workload below preempts and chunks.
ENGINE = dict(kv_cache_memory_gb=0.01, max_num_batched_tokens=48, max_model_len=200)
# A shared prefix of several blocks: prefix-cache hits.
SHARED = ("You are a careful assistant who answers every question briefly, precisely and politely, "
          "and who never repeats the question back to the user. ")


def workload(tokenizer) -> list[tuple[str, SamplingParams]]:
    eos = tokenizer.eos_token_id
    period = tokenizer.encode(".")[0]
    return [
        (SHARED + "List three colours", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)),
        (SHARED + "Count from one to twenty", SamplingParams(temperature=0, max_tokens=60, stop=[" skilled", "xyz"],
                                                                       include_stop_str_in_output=True)),
        (SHARED + "Name a city", SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[period])),
        ("What is 2 + 2? " * 8, SamplingParams(temperature=0, max_tokens=30, min_tokens=12)),
        ("Write a haiku about rain", SamplingParams(temperature=0.8, seed=7, max_tokens=45, logprobs=2)),
        ("The capital of France is", SamplingParams(temperature=0, max_tokens=1)),
        ("Tell me a story", SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=35,
                                           stop=["."], include_stop_str_in_output=True)),
        ("Hello", SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[eos], ignore_eos=True)),
    ]


def run(async_scheduling: bool, abort_after: int | None = None):
    """Runs the workload through the engine's own loop; with abort_after, the fourth request is
    aborted after that many steps. Returns the finished outputs by request id, and the engine."""
    llm = ProfessionalLLM(async_scheduling=async_scheduling, **ENGINE)
    engine = llm.engine
    ids = [engine.add_request(prompt, params) for prompt, params in workload(llm.tokenizer)]
    done, steps, overlapped = {}, 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        overlapped += engine.scheduler.num_pending_steps > 0  # a step left running on return
        if steps == abort_after:
            assert engine.abort_request(ids[3])
    return [done.get(i) for i in ids], engine, overlapped


def summary(out):
    """What a request returns, but for num_cached_tokens (a block is cached once the step computing
    it is postprocessed, which an overlapped step's admissions may not wait for) and logprobs."""
    o = out.outputs[0]
    return o.token_ids, o.text, o.finish_reason, o.stop_reason


def assert_same_logprobs(got, want):
    """The same entries, with values equal to float32 rounding: batches of other sizes split the
    attention of a long context differently, so its sums round differently."""
    assert (got is None) == (want is None)
    for g, w in zip(got or [], want or []):
        assert g.keys() == w.keys()
        assert all(abs(g[t] - w[t]) <= 1e-4 * (1 + abs(w[t])) for t in w)


@pytest.fixture(scope="module")
def lockstep():
    return run(async_scheduling=False)


def test_overlapped_steps_give_the_lockstep_results(lockstep):
    want, lock_engine, lock_overlapped = lockstep
    got, engine, overlapped = run(async_scheduling=True)
    assert lock_overlapped == 0 and overlapped > 10
    assert [summary(o) for o in got] == [summary(o) for o in want]
    for g, w in zip(got, want):
        assert_same_logprobs(g.outputs[0].logprobs, w.outputs[0].logprobs)
    assert want[4].outputs[0].logprobs  # the workload asks for some
    # The workload exercised what it claims to, in both modes.
    reasons = {o.outputs[0].finish_reason for o in want}
    assert reasons == {"length", "stop"}
    assert any(isinstance(o.outputs[0].stop_reason, str) for o in want)  # a stop string
    assert any(isinstance(o.outputs[0].stop_reason, int) for o in want)  # a stop token
    assert lock_engine.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert any(o.num_cached_tokens > 0 for o in want)
    for e in (engine, lock_engine):
        assert e.scheduler.num_free_blocks == e.scheduler.config.num_blocks
        assert not e.requests and not e.by_request_id and e.scheduler.num_pending_steps == 0
    # Overlapped, a prompt finds the prefix that earlier steps cached.
    request_id = engine.add_request(SHARED + "Name a river", SamplingParams(temperature=0, max_tokens=3))
    outputs = {}
    while engine.has_unfinished():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs[request_id].finished and outputs[request_id].num_cached_tokens >= 16


def test_an_abort_while_a_step_runs_loses_nothing(lockstep):
    want = lockstep[0]
    got, engine, _ = run(async_scheduling=True, abort_after=6)
    assert got[3] is None  # aborted: no output from the loop
    assert [summary(o) for i, o in enumerate(got) if i != 3] == [summary(o) for i, o in enumerate(want) if i != 3]
    assert engine.scheduler.num_free_blocks == engine.scheduler.config.num_blocks
    assert not engine.requests and engine.scheduler.num_pending_steps == 0


def test_penalties_run_in_lockstep_with_the_same_tokens():
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3)
    outs = []
    for async_scheduling in (False, True):
        llm = ProfessionalLLM(async_scheduling=async_scheduling, kv_cache_memory_gb=0.05)
        engine = llm.engine
        engine.add_request("one one one one one", params)
        engine.add_request("two", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        tokens = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
            assert engine.scheduler.num_pending_steps == 0  # no step is left running: lockstep
        outs.append(tokens)
    assert outs[0] == outs[1]


def test_a_failure_with_two_steps_pending_aborts_both_and_the_engine_recovers(monkeypatch):
    llm = ProfessionalLLM(async_scheduling=True, kv_cache_memory_gb=0.05)
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in ("a", "b")]
    engine.step()
    assert engine.scheduler.num_pending_steps == 1  # a step is running
    late = engine.add_request("c", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    calls = {"n": 0}
    run = engine.runner.run

    def failing_run(out, previous_tokens=None):  # the next step's model run fails
        calls["n"] += 1
        raise RuntimeError("injected model failure")

    monkeypatch.setattr(engine.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="injected model failure"):
        engine.step()
    monkeypatch.setattr(engine.runner, "run", run)
    assert calls["n"] == 1
    assert not any(i in engine.by_request_id for i in (*ids, late))  # every request of both steps
    assert not engine.has_unfinished() and engine.scheduler.num_pending_steps == 0
    assert engine.scheduler.stats.num_used_blocks == 0
    out = llm.generate("again", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out.token_ids) == 3
