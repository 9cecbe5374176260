"""The Python-level contract of the scheduler bindings (professional_nano_llm._C).

Expected values are computed here from the prompts and from block ids read back through
get_sequence(), never from the scheduler's own arrays.
"""

from __future__ import annotations

import gc
import random
import re
import weakref
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from professional_nano_llm import _C
from professional_nano_llm.engine import (
    BlockAllocator,
    FinishedSequence,
    ProtocolError,
    ScheduleOutput,
    Scheduler,
    SchedulerConfig,
    StopParams,
)

BS = 8  # block size of the hand-computed scenarios
FIELDS = ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "sample_indices")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def make_scheduler(**overrides) -> Scheduler:
    config = dict(num_blocks=64, block_size=BS, max_num_seqs=16, max_num_batched_tokens=256, max_model_len=128)
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


def exactly(max_tokens: int, **kwargs) -> StopParams:
    """Params that generate exactly max_tokens tokens."""
    return StopParams(max_tokens=max_tokens, ignore_eos=True, **kwargs)


def blocks_for(num_tokens: int, block_size: int = BS) -> int:
    return -(-num_tokens // block_size)


def slots(block_table: list[int], positions, block_size: int = BS) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def step(sched: Scheduler, token_for=lambda seq_id: 1) -> list[FinishedSequence]:
    """One engine step; token_for(seq_id) plays the model. Returns the finished sequences."""
    out = sched.schedule()
    return sched.postprocess([token_for(int(i)) for i in out.sampled_seq_ids])


def run_to_completion(sched: Scheduler, token_for=lambda seq_id: 1, max_steps: int = 10_000):
    """Steps until nothing is left; returns {seq_id: FinishedSequence}."""
    finished = {}
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return finished
        finished.update((f.id, f) for f in step(sched, token_for))
    raise AssertionError(f"not finished after {max_steps} steps")


def assert_runs_a_request(sched: Scheduler) -> None:
    """The scheduler still serves a valid request end to end and frees its blocks."""
    seq_id = sched.add([1, 2, 3], exactly(2))
    finished = run_to_completion(sched)
    assert [(f.id, f.reason, f.num_generated_tokens) for f in finished.values()] == [(seq_id, "length", 2)]
    assert sched.num_free_blocks == sched.config.num_blocks


def assert_arena_layout(out: ScheduleOutput) -> None:
    """arena is the documented fields back to back, and each field is a view into it."""
    fields = [getattr(out, name) for name in FIELDS] + [out.block_tables, out.placeholder_rows,
                                                         out.placeholder_sources]
    assert out.field_sizes == tuple(f.size for f in fields)
    np.testing.assert_array_equal(out.arena, np.concatenate([f.ravel() for f in fields]))
    for f in fields:
        assert f.dtype == np.int32
        assert f.size == 0 or np.shares_memory(f, out.arena)


# ----------------------------------------------------------------------------------------------
# SchedulerConfig and StopParams
# ----------------------------------------------------------------------------------------------


def test_scheduler_config_defaults():
    c = SchedulerConfig()
    assert (c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (
        1024, 16, 256, 8192, 4096)
    assert c.enable_prefix_caching is True


def test_scheduler_config_keywords():
    c = SchedulerConfig(num_blocks=7, block_size=32, max_num_seqs=3, max_num_batched_tokens=50, max_model_len=2,
                        enable_prefix_caching=False)
    assert (c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (
        7, 32, 3, 50, 2)
    assert c.enable_prefix_caching is False
    assert Scheduler(c).config.block_size == 32


@pytest.mark.parametrize("block_size", [8, 16, 64, 256])
def test_scheduler_config_accepts_power_of_two_block_sizes(block_size):
    assert SchedulerConfig(block_size=block_size).block_size == block_size


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=12), "block_size must be a power of two from 8 to 256, got 12"),
        (dict(block_size=4), "block_size must be a power of two from 8 to 256, got 4"),
        (dict(block_size=512), "block_size must be a power of two from 8 to 256, got 512"),
        (dict(block_size=0), "block_size must be a power of two from 8 to 256, got 0"),
        (dict(block_size=-8), "block_size must be a power of two from 8 to 256, got -8"),
        (dict(num_blocks=0), "num_blocks must be >= 1, got 0"),
        (dict(num_blocks=-3), "num_blocks must be >= 1, got -3"),
        (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be >= 1, got 0"),
        (dict(max_model_len=1), "max_model_len must be >= 2, got 1"),
        (dict(num_blocks=2**27, block_size=32), "num_blocks * block_size must fit in int32"),
    ],
)
def test_scheduler_config_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SchedulerConfig(**kwargs)


def test_stop_params_defaults_and_keywords():
    p = StopParams()
    assert (p.max_tokens, p.min_tokens, p.ignore_eos, p.stop_token_ids, p.eos_token_ids) == (16, 0, False, [], [])
    p = StopParams(max_tokens=5, min_tokens=2, ignore_eos=True, stop_token_ids=[7, 8], eos_token_ids=[2])
    assert (p.max_tokens, p.min_tokens, p.ignore_eos, p.stop_token_ids, p.eos_token_ids) == (5, 2, True, [7, 8], [2])
    p.max_tokens, p.stop_token_ids = 9, [1]
    assert (p.max_tokens, p.stop_token_ids) == (9, [1])


# ----------------------------------------------------------------------------------------------
# Scheduler.add
# ----------------------------------------------------------------------------------------------


def test_add_returns_increasing_int_ids():
    sched = make_scheduler()
    ids = [sched.add([5] * n) for n in (1, 4, 2)]
    assert (sched.num_waiting, sched.num_running, sched.has_unfinished) == (3, 0, True)
    run_to_completion(sched)
    with pytest.raises(ValueError):
        sched.add([])
    ids.append(sched.add([6]))  # after finished and rejected requests
    assert all(type(i) is int for i in ids)
    assert ids == sorted(set(ids))


def test_add_uses_default_params_and_copies_them():
    sched = make_scheduler()
    params = StopParams(max_tokens=3)
    copied = sched.add([1, 2], params)
    params.max_tokens = 1  # must not reach the queued request
    default = sched.add([1, 2])  # StopParams() generates 16 tokens without EOS ids
    finished = run_to_completion(sched)
    assert finished[copied].num_generated_tokens == 3
    assert finished[default].num_generated_tokens == 16


def test_add_accepts_numpy_prompt():
    sched = make_scheduler()
    seq_id = sched.add(np.arange(3, 8, dtype=np.int64), exactly(1))
    assert sched.get_sequence(seq_id).token_ids == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    "config, prompt, params, message",
    [
        ({}, [], StopParams(), "prompt must contain at least one token"),
        (dict(max_model_len=16), [1] * 16, StopParams(),
         "prompt has 16 tokens; with one generated token that exceeds max_model_len=16"),
        (dict(num_blocks=4), [1] * 20, StopParams(max_tokens=14),
         "request needs up to 5 KV blocks (20 prompt tokens + max_tokens=14) but the KV cache has only "
         "4 blocks of 8 tokens"),
        ({}, [1], StopParams(max_tokens=0), "max_tokens must be >= 1, got 0"),
        ({}, [1], StopParams(max_tokens=-2), "max_tokens must be >= 1, got -2"),
        ({}, [1], StopParams(max_tokens=4, min_tokens=5), "min_tokens must be in [0, max_tokens], got 5"),
        ({}, [1], StopParams(min_tokens=-1), "min_tokens must be in [0, max_tokens], got -1"),
        ({}, [4, -3, 2], StopParams(), "prompt must be in [0, 2^31), got -3"),
    ],
    ids=["empty", "too-long", "too-many-blocks", "max-tokens-0", "max-tokens-neg", "min-gt-max", "min-neg",
         "negative-id"],
)
def test_add_rejects_request_that_can_never_run(config, prompt, params, message):
    sched = make_scheduler(**config)
    with pytest.raises(ValueError, match=re.escape(message)):
        sched.add(prompt, params)
    assert (sched.num_waiting, sched.has_unfinished) == (0, False)
    assert_runs_a_request(sched)


@pytest.mark.parametrize(
    "config, prompt_len, params, num_generated",
    [
        (dict(max_model_len=16), 15, StopParams(max_tokens=100), 1),  # max_model_len ends it
        (dict(num_blocks=4), 20, exactly(13), 13),  # 20 + 13 - 1 = 32 tokens in KV: the whole pool
        (dict(num_blocks=4, max_model_len=33), 20, exactly(1000), 13),  # max_model_len caps the KV need
    ],
    ids=["prompt-at-max-model-len", "pool-exactly-full", "max-model-len-caps-blocks"],
)
def test_add_accepts_boundary_requests(config, prompt_len, params, num_generated):
    sched = make_scheduler(**config)
    seq_id = sched.add(list(range(prompt_len)), params)
    finished = run_to_completion(sched)
    assert (finished[seq_id].reason, finished[seq_id].num_generated_tokens) == ("length", num_generated)
    assert sched.num_free_blocks == sched.config.num_blocks


# ----------------------------------------------------------------------------------------------
# schedule(): exact contents of a small hand-computed scenario
# ----------------------------------------------------------------------------------------------

PROMPT_A = list(range(100, 110))  # 10 tokens: 2 blocks
PROMPT_B = list(range(200, 212))  # 12 tokens: only 6 fit the first step's budget of 16


def chunked_scenario() -> tuple[Scheduler, int, int]:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=16)
    return sched, sched.add(PROMPT_A, exactly(3)), sched.add(PROMPT_B, exactly(3))


def test_schedule_output_exact_contents_with_chunked_prefill():
    sched, a, b = chunked_scenario()

    # Step 1: A's whole prompt (10 tokens), then the first 6 tokens of B, which is not sampled.
    out = sched.schedule()
    table_a, table_b = sched.get_sequence(a).block_table, sched.get_sequence(b).block_table
    assert (len(table_a), len(table_b), len(set(table_a + table_b))) == (2, 1, 3)
    assert out.seq_ids.tolist() == [a, b]
    assert out.sampled_seq_ids.tolist() == [a]
    assert out.input_ids.tolist() == PROMPT_A + PROMPT_B[:6]
    assert out.positions.tolist() == [*range(10), *range(6)]
    assert out.slot_mapping.tolist() == slots(table_a, range(10)) + slots(table_b, range(6))
    assert out.cu_seqlens_q.tolist() == [0, 10, 16]
    assert out.context_lens.tolist() == [10, 6]
    assert out.sample_indices.tolist() == [9]
    assert out.block_tables.tolist() == [table_a, table_b + [-1]]
    assert (out.num_tokens, out.num_seqs, out.num_sampled, out.num_decode_seqs) == (16, 2, 1, 0)
    assert (out.block_table_width, out.max_seqlen_q, out.max_context_len) == (2, 10, 10)
    assert out.field_sizes == (16, 16, 16, 3, 2, 1, 4, 0, 0)
    assert out.preempted_seq_ids == []
    assert_arena_layout(out)
    assert sched.postprocess([7]) == []

    # Step 2: A decodes its sampled token first, then the rest of B's prompt in a second block.
    out = sched.schedule()
    table_b2 = sched.get_sequence(b).block_table
    assert table_b2[0] == table_b[0] and len(table_b2) == 2 and table_b2[1] not in table_a + table_b
    assert out.seq_ids.tolist() == [a, b]
    assert out.sampled_seq_ids.tolist() == [a, b]
    assert out.input_ids.tolist() == [7] + PROMPT_B[6:]
    assert out.positions.tolist() == [10, *range(6, 12)]
    assert out.slot_mapping.tolist() == slots(table_a, [10]) + slots(table_b2, range(6, 12))
    assert out.cu_seqlens_q.tolist() == [0, 1, 7]
    assert out.context_lens.tolist() == [11, 12]
    assert out.sample_indices.tolist() == [0, 6]
    assert out.block_tables.tolist() == [table_a, table_b2]
    assert (out.num_tokens, out.num_seqs, out.num_sampled, out.num_decode_seqs) == (7, 2, 2, 1)
    assert (out.block_table_width, out.max_seqlen_q, out.max_context_len) == (2, 6, 12)
    assert_arena_layout(out)
    assert sched.postprocess([8, 9]) == []

    # Step 3: two decodes.
    out = sched.schedule()
    assert out.input_ids.tolist() == [8, 9]
    assert out.positions.tolist() == [11, 12]
    assert out.slot_mapping.tolist() == slots(table_a, [11]) + slots(table_b2, [12])
    assert out.cu_seqlens_q.tolist() == [0, 1, 2]
    assert out.context_lens.tolist() == [12, 13]
    assert out.sample_indices.tolist() == [0, 1]
    assert (out.num_decode_seqs, out.max_seqlen_q, out.max_context_len) == (2, 1, 13)
    assert_arena_layout(out)
    finished = sched.postprocess([1, 2])
    assert [(f.id, f.reason, f.num_generated_tokens) for f in finished] == [(a, "length", 3)]


def test_schedule_output_array_types_are_numpy_views():
    sched, _, _ = chunked_scenario()
    out = sched.schedule()
    for name in FIELDS + ("block_tables", "arena"):
        array = getattr(out, name)
        assert isinstance(array, np.ndarray) and array.dtype == np.int32, name
        assert not array.flags.owndata, name
    for name in ("seq_ids", "sampled_seq_ids"):
        assert getattr(out, name).dtype == np.int64 and not getattr(out, name).flags.owndata
    assert out.block_tables.ndim == 2 and out.block_tables.flags.c_contiguous
    for name in FIELDS:
        assert np.shares_memory(getattr(out, name), out.arena), name
    assert np.shares_memory(out.block_tables, out.arena)


def test_arena_is_never_reallocated_between_steps():
    """Two outputs alternate, so a step's views stay valid while the next one is planned (overlapped
    steps), and show the contents of the step after next."""
    sched, _, _ = chunked_scenario()
    first = sched.schedule().arena
    sched.postprocess([7])
    second = sched.schedule().arena
    assert first.ctypes.data != second.ctypes.data
    assert first[0] == PROMPT_A[0]  # still the first step's
    sched.postprocess([8, 9])
    third = sched.schedule().arena
    assert first.ctypes.data == third.ctypes.data
    assert first[0] == 8  # the third step's contents


def test_output_arrays_keep_scheduler_alive():
    def arrays_of_first_step():
        sched, a, b = chunked_scenario()
        out = sched.schedule()
        return weakref.ref(sched), [a, b], out.input_ids, out.block_tables, out.seq_ids

    scheduler_ref, ids, input_ids, block_tables, seq_ids = arrays_of_first_step()
    gc.collect()
    assert scheduler_ref() is not None
    assert input_ids.tolist() == PROMPT_A + PROMPT_B[:6]
    assert block_tables.shape == (2, 2) and block_tables[1, 1] == -1
    assert seq_ids.tolist() == ids
    del input_ids, block_tables, seq_ids
    gc.collect()
    assert scheduler_ref() is None  # and nothing leaks once the views are gone


def test_idle_schedule_is_empty():
    sched = make_scheduler()
    out = sched.schedule()
    assert (out.num_tokens, out.num_seqs, out.num_sampled, out.block_table_width) == (0, 0, 0, 0)
    assert out.cu_seqlens_q.tolist() == [0]
    assert out.field_sizes == (0, 0, 0, 1, 0, 0, 0, 0, 0)
    assert out.block_tables.shape == (0, 0)
    assert sched.postprocess([]) == []
    assert not sched.step_pending


# ----------------------------------------------------------------------------------------------
# postprocess() and the call protocol
# ----------------------------------------------------------------------------------------------


PROMPT_1, PROMPT_2 = [1, 2, 3], [4, 5]


def pending_step_of_two() -> tuple[Scheduler, int, int]:
    """A scheduler whose pending step samples two sequences."""
    sched = make_scheduler()
    a, b = sched.add(PROMPT_1, exactly(5)), sched.add(PROMPT_2, exactly(5))
    assert sched.schedule().sampled_seq_ids.tolist() == [a, b]
    return sched, a, b


def assert_retry_works(sched: Scheduler, a: int, b: int) -> None:
    """After a rejected postprocess nothing was applied, the step is pending and a correct call works."""
    assert sched.step_pending
    # The pending step counts its tokens as computed; the one it samples is a placeholder (-1).
    assert (sched.get_sequence(a).token_ids, sched.get_sequence(a).num_computed_tokens) == (PROMPT_1 + [-1], 3)
    assert sched.postprocess([7, 8]) == []
    assert not sched.step_pending
    assert (sched.get_sequence(a).token_ids, sched.get_sequence(b).token_ids) == (PROMPT_1 + [7], PROMPT_2 + [8])
    assert sched.get_sequence(a).num_computed_tokens == len(PROMPT_1)


@pytest.mark.parametrize(
    "sampled",
    [
        np.array([41, 42], dtype=np.int32),
        np.array([41, 42], dtype=np.int64),
        [41, 42],
        np.array([41, 0, 42], dtype=np.int32)[::2],  # not contiguous
        torch.tensor([41, 42]),  # what a torch sampler returns, moved to the CPU
    ],
    ids=["int32", "int64", "list", "strided", "torch"],
)
def test_postprocess_accepts_arrays_and_lists(sampled):
    sched, a, b = pending_step_of_two()
    assert sched.postprocess(sampled) == []
    assert sched.get_sequence(a).token_ids == PROMPT_1 + [41]
    assert sched.get_sequence(b).token_ids == PROMPT_2 + [42]
    assert not sched.step_pending


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1], "postprocess() expects 2 sampled tokens, got 1"),
        ([1, 2, 3], "postprocess() expects 2 sampled tokens, got 3"),
        ([], "postprocess() expects 2 sampled tokens, got 0"),
        ([1, -5], "sampled tokens must be in [0, 2^31), got -5"),
    ],
)
def test_rejected_postprocess_leaves_step_pending(bad, message):
    sched, a, b = pending_step_of_two()
    with pytest.raises(ValueError, match=re.escape(message)):
        sched.postprocess(bad)
    assert_retry_works(sched, a, b)


@pytest.mark.parametrize(
    "bad",
    [np.array([2**32 + 5, 8], dtype=np.int64), np.array([5.9, 8.0])],
    ids=["int64-beyond-int32", "float64"],
)
def test_postprocess_does_not_silently_narrow_token_ids(bad):
    """An int64 id that does not fit int32, or floats (say, probabilities passed by mistake), must be
    rejected like add() rejects them, not wrapped or truncated into a different valid token id."""
    sched, a, b = pending_step_of_two()
    with pytest.raises((TypeError, ValueError)):
        sched.postprocess(bad)
    assert_retry_works(sched, a, b)


def test_protocol_error_is_a_runtime_error():
    assert ProtocolError is _C.ProtocolError
    assert issubclass(ProtocolError, RuntimeError)


def test_postprocess_without_schedule_raises_protocol_error():
    sched = make_scheduler()
    seq_id = sched.add([1, 2], exactly(2))
    with pytest.raises(ProtocolError, match="without a pending schedule"):
        sched.postprocess([])
    sched.schedule()
    sched.postprocess([3])
    with pytest.raises(ProtocolError, match="without a pending schedule"):
        sched.postprocess([3])
    assert sched.get_sequence(seq_id).token_ids == [1, 2, 3]  # the rejected call appended nothing
    assert [(f.id, f.num_generated_tokens) for f in step(sched)] == [(seq_id, 2)]


def test_a_third_pending_step_raises_protocol_error():
    sched = make_scheduler()
    seq_id = sched.add([1, 2], exactly(1))
    sched.schedule()
    assert sched.schedule().num_seqs == 0  # planned while the first runs: its only token is pending
    with pytest.raises(ProtocolError, match=re.escape("schedule() called with two steps pending")):
        sched.schedule()
    assert sched.num_pending_steps == 2
    assert [f.id for f in sched.postprocess([3])] == [seq_id]
    assert sched.postprocess([]) == []
    assert not sched.step_pending


# ----------------------------------------------------------------------------------------------
# Finish reasons, abort, get_sequence
# ----------------------------------------------------------------------------------------------


def generate(params: StopParams, script: list[int]) -> tuple[FinishedSequence, list[int]]:
    """Runs one request, feeding it the scripted tokens; returns how it finished and what it got."""
    sched = make_scheduler()
    seq_id = sched.add([11, 12, 13], params)
    fed = []
    for token in script:
        out = sched.schedule()
        assert out.sampled_seq_ids.tolist() == [seq_id]
        fed.append(token)
        finished = sched.postprocess([token])
        if finished:
            assert sched.get_sequence(seq_id) is None and not sched.has_unfinished
            assert sched.num_free_blocks == sched.config.num_blocks
            return finished[0], fed
    raise AssertionError(f"{params} did not finish on {script}")


@pytest.mark.parametrize(
    "params, script, reason, stop_token, num_generated",
    [
        (StopParams(max_tokens=10, eos_token_ids=[42, 43]), [1, 43, 5], "stop", None, 2),
        (StopParams(max_tokens=10, stop_token_ids=[7, 9]), [1, 2, 9, 5], "stop", 9, 3),
        (StopParams(max_tokens=3), [42, 7, 9, 5], "length", None, 3),
        (StopParams(max_tokens=10, min_tokens=3, eos_token_ids=[42]), [42, 42, 42, 5], "stop", None, 3),
        (StopParams(max_tokens=10, min_tokens=2, stop_token_ids=[9]), [9, 9, 5], "stop", 9, 2),
        (StopParams(max_tokens=10, ignore_eos=True, eos_token_ids=[42], stop_token_ids=[9]), [42, 42, 9, 5],
         "stop", 9, 3),
        (StopParams(max_tokens=3, ignore_eos=True, eos_token_ids=[42]), [42, 42, 42, 5], "length", None, 3),
    ],
    ids=["eos", "stop-id", "length", "eos-after-min-tokens", "stop-id-after-min-tokens", "ignore-eos-stop-id",
         "ignore-eos-length"],
)
def test_finish_reasons(params, script, reason, stop_token, num_generated):
    finished, fed = generate(params, script)
    assert (finished.reason, finished.stop_token, finished.num_generated_tokens) == (reason, stop_token,
                                                                                     num_generated)
    assert len(fed) == num_generated
    assert finished.num_cached_tokens == 0
    assert repr(finished) == f"FinishedSequence(id={finished.id}, reason='{reason}')"


def test_get_sequence_snapshots():
    sched = make_scheduler(max_num_seqs=1)
    a, b = sched.add([1, 2, 3, 4, 5, 6, 7, 8, 9], exactly(2)), sched.add([5, 6], exactly(1))
    waiting = sched.get_sequence(a)
    assert (waiting.id, waiting.status, waiting.token_ids, waiting.num_prompt_tokens) == (a, "waiting",
                                                                                         [*range(1, 10)], 9)
    assert (waiting.num_computed_tokens, waiting.block_table, waiting.num_preemptions) == (0, [], 0)

    step(sched, lambda seq_id: 50)  # max_num_seqs=1: only a runs
    running = sched.get_sequence(a)
    assert (running.status, running.token_ids, running.num_computed_tokens) == ("running", [*range(1, 10), 50], 9)
    assert len(running.block_table) == blocks_for(9) and len(set(running.block_table)) == 2
    assert sched.get_sequence(b).status == "waiting"
    assert waiting.status == "waiting" and waiting.token_ids == [*range(1, 10)]  # a copy, not a live view
    assert (sched.num_running, sched.num_waiting) == (1, 1)

    run_to_completion(sched)
    assert sched.get_sequence(a) is None and sched.get_sequence(b) is None
    assert sched.get_sequence(12345) is None


def test_abort_waiting_and_running_sequences():
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = sched.add([1] * 20, exactly(5)), sched.add([2] * 4, exactly(5))
    step(sched)
    assert sched.num_free_blocks == 64 - blocks_for(20)
    assert sched.abort(running) is True
    assert sched.abort(running) is False
    assert sched.get_sequence(running) is None
    assert sched.num_free_blocks == 64
    assert sched.abort(waiting) is True
    assert sched.abort(waiting) is False
    assert sched.abort(999) is False
    assert (sched.has_unfinished, sched.num_running, sched.num_waiting) == (False, 0, 0)
    assert_runs_a_request(sched)


def test_abort_finished_sequence_returns_false():
    sched = make_scheduler()
    seq_id = sched.add([1, 2], exactly(1))
    assert [f.id for f in step(sched)] == [seq_id]
    assert sched.abort(seq_id) is False


def test_abort_during_pending_step_skips_its_token():
    sched, a, b = pending_step_of_two()
    assert sched.abort(a) is True
    assert sched.abort(a) is False
    assert sched.get_sequence(a) is None
    with pytest.raises(ValueError, match="expects 2 sampled tokens"):  # the step's shape does not change
        sched.postprocess([70])
    assert sched.postprocess([70, 80]) == []  # a's token is dropped, not given to b
    assert sched.get_sequence(b).token_ids == PROMPT_2 + [80]
    out = sched.schedule()
    assert out.seq_ids.tolist() == [b] and out.input_ids.tolist() == [80]
    sched.postprocess([1])
    run_to_completion(sched)
    assert sched.num_free_blocks == 64


# ----------------------------------------------------------------------------------------------
# Prefix caching
# ----------------------------------------------------------------------------------------------

PREFIX = list(range(1000, 1024))  # 3 full blocks
SHARED_A = PREFIX + [1, 2, 3, 4]  # 28 tokens
SHARED_B = PREFIX + [5, 6, 7, 8, 9]  # 29 tokens
MAX_TOKENS = 4


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_reuses_shared_prefix_of_finished_request(caching):
    sched = make_scheduler(enable_prefix_caching=caching)
    a = sched.add(SHARED_A, exactly(MAX_TOKENS))
    finished = run_to_completion(sched)
    b = sched.add(SHARED_B, exactly(MAX_TOKENS))
    first_positions = sched.schedule().positions.tolist()
    sched.postprocess([1])
    finished |= run_to_completion(sched)

    hit_tokens = len(PREFIX) if caching else 0
    assert finished[a].num_cached_tokens == 0
    assert finished[b].num_cached_tokens == hit_tokens
    stats = sched.stats
    assert stats.prefix_hits == hit_tokens
    if caching:
        # Full blocks whose KV was computed: a's (28 + 4 - 1) // 8 = 3, then b adds its 4th.
        assert stats.prefix_queries == len(SHARED_A) + len(SHARED_B)
        assert stats.num_cached_blocks == (len(SHARED_B) + MAX_TOKENS - 1) // BS
    else:
        assert (stats.prefix_queries, stats.num_cached_blocks) == (0, 0)
    assert (stats.num_blocks, stats.num_used_blocks) == (64, 0)
    assert sched.num_free_blocks == 64
    # Only b's uncached tokens were computed in its first step.
    assert first_positions == list(range(hit_tokens, len(SHARED_B)))
    assert (finished[a].num_generated_tokens, finished[b].num_generated_tokens) == (MAX_TOKENS, MAX_TOKENS)


def test_reset_prefix_cache_waits_for_running_sequences():
    sched = make_scheduler()
    sched.add(SHARED_A, exactly(MAX_TOKENS))
    sched.schedule()
    sched.postprocess([1])
    assert sched.reset_prefix_cache() is False  # the request is running and holds its blocks
    assert sched.stats.num_cached_blocks > 0
    run_to_completion(sched)
    assert sched.reset_prefix_cache() is True
    assert sched.stats.num_cached_blocks == 0
    b = sched.add(SHARED_B, exactly(MAX_TOKENS))
    assert sched.schedule().positions.tolist() == list(range(len(SHARED_B)))  # all recomputed
    sched.postprocess([1])
    assert run_to_completion(sched)[b].num_cached_tokens == 0
    assert sched.num_free_blocks == 64


def test_live_sequences_share_prefix_blocks():
    sched = make_scheduler()
    a = sched.add(SHARED_A, exactly(MAX_TOKENS))
    step(sched)  # a's prefill registers its 3 full blocks
    b = sched.add(SHARED_B, exactly(MAX_TOKENS))
    out = sched.schedule()
    table_a, table_b = sched.get_sequence(a).block_table, sched.get_sequence(b).block_table
    assert table_b[:3] == table_a[:3]
    assert set(table_b[3:]).isdisjoint(table_a)
    assert sched.num_free_blocks == 64 - len(set(table_a + table_b))
    assert out.seq_ids.tolist() == [a, b]
    assert out.input_ids.tolist() == [1] + SHARED_B[24:]
    assert out.positions.tolist() == [28, *range(24, 29)]
    sched.postprocess([1, 1])
    assert sched.abort(a) is True  # b keeps the shared blocks
    assert sched.num_free_blocks == 64 - len(table_b)
    finished = run_to_completion(sched)
    assert (finished[b].reason, finished[b].num_cached_tokens) == ("length", 24)
    assert sched.num_free_blocks == 64


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------


class QueueModel:
    """The documented admission policy: FIFO admission, the newest running sequence is preempted
    and goes back to the front of the waiting queue."""

    def __init__(self, ids: list[int]):
        self.waiting, self.running = list(ids), []  # running in admission order, oldest first

    def check_step(self, out: ScheduleOutput) -> None:
        for seq_id in out.preempted_seq_ids:
            assert self.running[-1] == seq_id, "preempted a sequence that is not the newest running one"
            self.waiting.insert(0, self.running.pop())
        admitted = [i for i in out.seq_ids.tolist() if i not in self.running]
        assert admitted == self.waiting[: len(admitted)], "admission is not FIFO"
        del self.waiting[: len(admitted)]
        self.running += admitted

    def finish(self, seq_id: int) -> None:
        self.running.remove(seq_id)


def test_preemption_recovers_and_leaks_no_blocks():
    num_blocks, max_tokens = 6, 20  # each request needs blocks_for(10 + 20 - 1) = 4 of the 6 blocks
    sched = make_scheduler(num_blocks=num_blocks)
    ids = [sched.add([100 * i + j for j in range(10)], exactly(max_tokens)) for i in range(4)]
    queue, generated, finished, preempted = QueueModel(ids), {i: 0 for i in ids}, {}, []
    while sched.has_unfinished:
        out = sched.schedule()
        queue.check_step(out)
        preempted += out.preempted_seq_ids
        for seq_id in out.preempted_seq_ids:
            snapshot = sched.get_sequence(seq_id)
            assert (snapshot.status, snapshot.block_table, snapshot.num_computed_tokens) == ("waiting", [], 0)
            assert seq_id not in out.seq_ids.tolist()
        for seq_id in out.sampled_seq_ids.tolist():
            generated[seq_id] += 1
        for f in sched.postprocess([3] * out.num_sampled):
            finished[f.id] = f
            queue.finish(f.id)
    assert sched.num_preemptions == len(preempted) > 0
    assert generated == {i: max_tokens for i in ids}  # recomputation never samples a token twice
    assert {i: (f.reason, f.num_generated_tokens) for i, f in finished.items()} == {
        i: ("length", max_tokens) for i in ids}
    assert sched.num_free_blocks == num_blocks
    assert sched.stats.num_used_blocks == 0


# ----------------------------------------------------------------------------------------------
# BlockAllocator
# ----------------------------------------------------------------------------------------------

TOKENS_0 = list(range(8))
TOKENS_1 = list(range(8, 16))


def test_block_allocator_allocate_and_release():
    alloc = BlockAllocator(4, block_size=8)
    assert (alloc.num_blocks, alloc.block_size, alloc.num_free_blocks, alloc.num_used_blocks) == (4, 8, 4, 0)
    blocks = [alloc.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert [alloc.ref_count(b) for b in blocks] == [1, 1, 1, 1]
    assert (alloc.num_free_blocks, alloc.num_used_blocks) == (0, 4)
    with pytest.raises(ValueError, match="no free KV block"):
        alloc.allocate()
    alloc.release(blocks[2])
    assert (alloc.ref_count(blocks[2]), alloc.num_free_blocks) == (0, 1)
    assert alloc.allocate() == blocks[2]
    with pytest.raises(ValueError, match="no free KV block"):
        alloc.allocate()


def test_block_allocator_prefix_cache_and_ref_counts():
    alloc = BlockAllocator(4, block_size=8)
    b0, b1 = alloc.allocate(), alloc.allocate()
    alloc.cache_full_block(b0, -1, TOKENS_0)
    alloc.cache_full_block(b1, b0, np.array(TOKENS_1, dtype=np.int32))
    assert (alloc.is_cached(b0), alloc.is_cached(b1)) == (True, True)
    assert alloc.stats.num_cached_blocks == 2
    assert alloc.match_prefix(TOKENS_0 + TOKENS_1 + [99]) == [b0, b1]
    assert alloc.match_prefix(TOKENS_0 + TOKENS_1, max_blocks=1) == [b0]
    assert alloc.match_prefix(TOKENS_1 + TOKENS_0) == []  # b1 is only cached after b0
    assert alloc.match_prefix(TOKENS_0[:7]) == []  # no full block
    assert alloc.match_prefix(TOKENS_0 + [0] * 8) == [b0]

    alloc.acquire(b0)
    assert alloc.ref_count(b0) == 2
    alloc.release(b0)
    alloc.release(b0)
    assert (alloc.ref_count(b0), alloc.num_free_blocks, alloc.is_cached(b0)) == (0, 3, True)
    assert alloc.match_prefix(TOKENS_0) == [b0]  # freed but still reusable
    alloc.acquire(b0)  # takes it back off the free list
    assert (alloc.ref_count(b0), alloc.num_free_blocks) == (1, 2)
    assert alloc.stats.num_used_blocks == 2


def test_block_allocator_reclaims_uncached_blocks_before_cached_ones():
    alloc = BlockAllocator(4, block_size=8)
    cached = alloc.allocate()
    alloc.cache_full_block(cached, -1, TOKENS_0)
    alloc.release(cached)
    others = [alloc.allocate() for _ in range(3)]
    assert cached not in others and alloc.is_cached(cached)
    assert alloc.match_prefix(TOKENS_0) == [cached]
    assert alloc.allocate() == cached  # the last free block: its prefix is evicted
    assert (alloc.is_cached(cached), alloc.match_prefix(TOKENS_0), alloc.stats.num_cached_blocks) == (False, [], 0)


def test_block_allocator_without_prefix_caching():
    alloc = BlockAllocator(4, block_size=8, enable_prefix_caching=False)
    block = alloc.allocate()
    alloc.cache_full_block(block, -1, TOKENS_0)
    assert (alloc.is_cached(block), alloc.match_prefix(TOKENS_0), alloc.stats.num_cached_blocks) == (False, [], 0)


def test_block_allocator_errors():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="block_size must be a power of two from 8 to 256, got 24"):
        BlockAllocator(4, block_size=24)
    alloc = BlockAllocator(4, block_size=8)
    with pytest.raises(ValueError, match=re.escape("block id 4 out of range [0, 4)")):
        alloc.ref_count(4)
    with pytest.raises(ValueError, match=re.escape("block id -1 out of range [0, 4)")):
        alloc.is_cached(-1)
    with pytest.raises(ProtocolError, match="has no owner"):
        alloc.release(0)
    with pytest.raises(ProtocolError, match="holds no cached prefix"):
        alloc.acquire(0)
    block = alloc.allocate()
    with pytest.raises(ValueError, match="exactly block_size"):
        alloc.cache_full_block(block, -1, TOKENS_0[:7])
    with pytest.raises(ProtocolError, match="parent block is not cached"):
        alloc.cache_full_block(block, alloc.allocate(), TOKENS_0)
    free_block = next(b for b in range(4) if alloc.ref_count(b) == 0)
    with pytest.raises(ProtocolError, match="needs an owned block that is not cached yet"):
        alloc.cache_full_block(free_block, -1, TOKENS_0)
    alloc.cache_full_block(block, -1, TOKENS_0)
    with pytest.raises(ProtocolError, match="needs an owned block that is not cached yet"):
        alloc.cache_full_block(block, -1, TOKENS_0)
    assert (alloc.num_free_blocks, alloc.stats.num_cached_blocks) == (2, 1)


# ----------------------------------------------------------------------------------------------
# A whole engine loop with a deterministic fake model
# ----------------------------------------------------------------------------------------------

VOCAB = 997
STOP_IDS = list(range(0, VOCAB, 37))  # about 3% of sampled tokens stop a request


@dataclass
class Request:
    prompt: list[int]
    params: StopParams


def make_requests(n: int = 20, seed: int = 1234) -> list[Request]:
    rng = random.Random(seed)
    system_prompt = [rng.randrange(VOCAB) for _ in range(24)]
    requests = []
    for i in range(n):
        prompt = (system_prompt if i % 2 == 0 else []) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))]
        max_tokens = rng.randint(1, 32)
        params = StopParams(max_tokens=max_tokens, min_tokens=rng.randint(0, min(2, max_tokens)),
                            stop_token_ids=STOP_IDS)
        requests.append(Request(prompt, params))
    return requests


def reference_generation(request: Request) -> tuple[list[int], str]:
    """What the fake model generates for a request run alone, without any scheduler."""
    total, generated = sum(request.prompt), []
    while True:
        token = total % VOCAB
        generated.append(token)
        total += token
        if len(generated) >= request.params.min_tokens and token in request.params.stop_token_ids:
            return generated, "stop"
        if len(generated) >= request.params.max_tokens:
            return generated, "length"


class FakeModel:
    """next token = sum of all tokens of the sequence % 997, read back through a simulated KV cache.

    The step's input_ids are written at their slot_mapping, then each sampled sequence sums its
    context through its block table, so a wrong slot, block table or prefix hit changes the tokens.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.kv = np.full(num_blocks * block_size, -(10**9), dtype=np.int64)

    def __call__(self, out: ScheduleOutput, input_ids: np.ndarray) -> np.ndarray:
        self.kv[out.slot_mapping] = input_ids
        row_of = {seq_id: row for row, seq_id in enumerate(out.seq_ids.tolist())}
        tokens = []
        for seq_id in out.sampled_seq_ids.tolist():
            row = row_of[seq_id]
            pos = np.arange(out.context_lens[row])
            context = self.kv[out.block_tables[row, pos // self.block_size] * self.block_size + pos % self.block_size]
            tokens.append(int(context.sum() % VOCAB))
        return np.array(tokens, dtype=np.int32)


def check_step_invariants(out: ScheduleOutput, tracked: dict[int, list[int]], config: SchedulerConfig,
                          input_ids: np.ndarray, another_pending: bool) -> None:
    """Step invariants that hold for every schedule() output, checked against Python's own token record
    (every token sampled so far, a pending step's included). input_ids: the step's, with the tokens a
    pending step samples filled in as the runner does."""
    assert_arena_layout(out)
    bs, seq_ids = config.block_size, out.seq_ids.tolist()
    q_lens = np.diff(out.cu_seqlens_q)
    assert out.cu_seqlens_q[0] == 0 and out.cu_seqlens_q[-1] == out.num_tokens and (q_lens > 0).all()
    assert out.num_seqs == len(seq_ids) == len(set(seq_ids)) <= config.max_num_seqs
    assert (another_pending or 0 < out.num_tokens) and out.num_tokens <= config.max_num_batched_tokens
    assert another_pending or out.num_placeholders == 0
    assert (out.input_ids[out.placeholder_rows] == 0).all()
    if out.num_seqs == 0:
        return
    assert not set(out.preempted_seq_ids) & set(seq_ids)
    assert len(np.unique(out.slot_mapping)) == out.num_tokens  # no two tokens share a KV slot
    leading_decodes = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    assert out.num_decode_seqs == leading_decodes
    assert (out.max_seqlen_q, out.max_context_len) == (q_lens.max(), out.context_lens.max())
    sampled_rows = []
    for row, seq_id in enumerate(seq_ids):
        tokens, start, end = tracked[seq_id], out.cu_seqlens_q[row], out.cu_seqlens_q[row + 1]
        first_pos, ctx = out.positions[start], out.context_lens[row]
        assert out.positions[start:end].tolist() == list(range(first_pos, ctx))
        assert input_ids[start:end].tolist() == tokens[first_pos:ctx]
        table, num_blocks = out.block_tables[row], blocks_for(ctx, bs)  # exactly the blocks the context needs
        assert (table[num_blocks:] == -1).all()
        assert ((table[:num_blocks] >= 0) & (table[:num_blocks] < config.num_blocks)).all()
        assert out.slot_mapping[start:end].tolist() == slots(table.tolist(), range(first_pos, ctx), bs)
        if ctx == len(tokens):
            sampled_rows.append(row)
    assert out.sampled_seq_ids.tolist() == [seq_ids[row] for row in sampled_rows]
    assert out.sample_indices.tolist() == [out.cu_seqlens_q[row + 1] - 1 for row in sampled_rows]


@dataclass
class DriveResult:
    generated: dict[int, list[int]]
    finished: dict[int, FinishedSequence]
    num_preemptions: int
    chunked_steps: int
    prefix_hits: int


def drive(requests: list[Request], config: SchedulerConfig, arrivals_per_step: int = 2,
          overlapped: bool = False) -> DriveResult:
    """The engine loop: requests arrive a few per step, so later ones can hit earlier prefixes.
    Overlapped: each step is scheduled while the one before is pending, and reads the tokens that
    one samples as the runner does, from its output on the device."""
    sched, model = Scheduler(config), FakeModel(config.num_blocks, config.block_size)
    pending, tracked, index_of, finished = list(requests), {}, {}, {}
    queue, chunked_steps, inflight = QueueModel([]), 0, []  # inflight: (sampled seq ids, tokens), oldest first
    generated = {}
    while pending or sched.has_unfinished or inflight:
        for request in pending[:arrivals_per_step]:
            seq_id = sched.add(request.prompt, request.params)
            tracked[seq_id], index_of[seq_id] = list(request.prompt), len(index_of)
            generated[index_of[seq_id]] = []
            queue.waiting.append(seq_id)
        del pending[:arrivals_per_step]
        if sched.has_unfinished:
            another_pending = sched.step_pending
            out = sched.schedule()
            input_ids = out.input_ids.copy()
            if out.num_placeholders:
                input_ids[out.placeholder_rows] = inflight[-1][1][out.placeholder_sources]
            check_step_invariants(out, tracked, config, input_ids, another_pending)
            queue.check_step(out)
            chunked_steps += out.num_sampled < out.num_seqs
            tokens = model(out, input_ids)
            for seq_id, token in zip(out.sampled_seq_ids.tolist(), tokens.tolist()):
                tracked[seq_id].append(token)  # what the device knows; a finished sequence's is dropped below
            inflight.append((out.sampled_seq_ids.tolist(), tokens))
        if inflight and (not overlapped or len(inflight) == 2 or not sched.has_unfinished):
            sampled_ids, tokens = inflight.pop(0)
            for seq_id, token in zip(sampled_ids, tokens.tolist()):
                if seq_id not in finished:
                    generated[index_of[seq_id]].append(token)
            for f in sched.postprocess(tokens):
                assert f.id not in finished
                finished[f.id] = f
                queue.finish(f.id)
    assert sched.num_free_blocks == config.num_blocks and sched.stats.num_used_blocks == 0
    assert (sched.num_running, sched.num_waiting, sched.num_pending_steps) == (0, 0, 0)
    return DriveResult(generated, {index_of[i]: f for i, f in finished.items()}, sched.num_preemptions,
                       chunked_steps, sched.stats.prefix_hits)


REQUESTS = make_requests()
LARGEST_REQUEST_BLOCKS = max(blocks_for(len(r.prompt) + r.params.max_tokens - 1) for r in REQUESTS)
DRIVE_CONFIGS = {
    "big-pool-big-budget": dict(num_blocks=512, block_size=16, max_num_batched_tokens=4096),
    "tiny-budget-chunking": dict(num_blocks=512, block_size=8, max_num_batched_tokens=13),
    "tiny-pool-preemption": dict(num_blocks=LARGEST_REQUEST_BLOCKS + 2, block_size=8, max_num_batched_tokens=256),
    "no-prefix-caching": dict(num_blocks=512, block_size=16, max_num_batched_tokens=4096,
                              enable_prefix_caching=False),
}


def test_reference_generation_covers_both_finish_reasons():
    reasons = [reference_generation(r)[1] for r in REQUESTS]
    assert "stop" in reasons and "length" in reasons


@pytest.mark.parametrize("overlapped", [False, True], ids=["lockstep", "overlapped"])
@pytest.mark.parametrize("name", DRIVE_CONFIGS)
def test_drive_loop_matches_reference_generation(name, overlapped):
    config = SchedulerConfig(max_num_seqs=256, max_model_len=256, **DRIVE_CONFIGS[name])
    result = drive(REQUESTS, config, overlapped=overlapped)

    for i, request in enumerate(REQUESTS):
        tokens, reason = reference_generation(request)
        assert result.generated[i] == tokens, f"request {i}"
        f = result.finished[i]
        assert (f.reason, f.num_generated_tokens) == (reason, len(tokens)), f"request {i}"
        assert f.stop_token == (tokens[-1] if reason == "stop" else None), f"request {i}"

    # Each configuration exercises what it is named for.
    if name == "tiny-budget-chunking":
        assert result.chunked_steps > 0
    if name == "tiny-pool-preemption":
        assert result.num_preemptions > 0
    if name == "no-prefix-caching":
        assert result.prefix_hits == 0
        assert all(f.num_cached_tokens == 0 for f in result.finished.values())
    else:
        assert result.prefix_hits > 0
