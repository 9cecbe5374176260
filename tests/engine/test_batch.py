"""Batch.from_output: a ScheduleOutput as int32 torch tensors that alias the scheduler's arena."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from professional_nano_llm.engine import Batch, ScheduleOutput, Scheduler, SchedulerConfig, StopParams
from professional_nano_llm.engine.batch import StepStaging

BS = 8
PROMPT_A = list(range(100, 110))  # 10 tokens, sampled in the first step
PROMPT_B = list(range(200, 212))  # 12 tokens, chunked: 6 in the first step
TENSOR_FIELDS = ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "sample_indices")


def make_scheduler(max_num_batched_tokens: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(num_blocks=16, block_size=BS, max_num_batched_tokens=max_num_batched_tokens,
                                     max_model_len=64))


def first_step_of_two_prompts() -> tuple[Scheduler, ScheduleOutput]:
    sched = make_scheduler()
    for prompt in (PROMPT_A, PROMPT_B):
        sched.add(prompt, StopParams(max_tokens=4, ignore_eos=True))
    return sched, sched.schedule()


def assert_batch_matches(batch: Batch, out: ScheduleOutput) -> None:
    for name in TENSOR_FIELDS + ("block_tables",):
        tensor, view = getattr(batch, name), getattr(out, name)
        assert tensor.dtype == torch.int32, name
        assert tuple(tensor.shape) == view.shape, name
        assert tensor.tolist() == view.tolist(), name
    assert tuple(batch.block_tables.shape) == (out.num_seqs, out.block_table_width)
    assert (batch.num_decode_seqs, batch.max_seqlen_q, batch.max_context_len) == (
        out.num_decode_seqs, out.max_seqlen_q, out.max_context_len)


def test_batch_matches_output_views():
    _, out = first_step_of_two_prompts()
    batch = Batch.from_output(out)
    assert_batch_matches(batch, out)
    assert batch.input_ids.tolist() == PROMPT_A + PROMPT_B[:6]
    assert batch.cu_seqlens_q.tolist() == [0, 10, 16]
    assert batch.sample_indices.tolist() == [9]
    assert tuple(batch.block_tables.shape) == (2, 2) and batch.block_tables[1, 1].item() == -1


@pytest.mark.parametrize("device", [None, torch.device("cpu")], ids=["no-device", "cpu"])
def test_batch_tensors_alias_the_arena(device):
    _, out = first_step_of_two_prompts()
    batch = Batch.from_output(out, device=device)
    arena = out.arena
    offsets = np.cumsum((0,) + out.field_sizes)
    for i, name in enumerate(TENSOR_FIELDS + ("block_tables",)):
        tensor = getattr(batch, name)
        assert tensor.data_ptr() == arena.ctypes.data + 4 * offsets[i], name
        assert np.shares_memory(tensor.numpy(), arena), name
    arena[0] = 4242  # a write through the arena shows in the tensor: no copy was made
    assert batch.input_ids[0].item() == 4242


def test_batch_across_steps_with_decode_first():
    sched, out = first_step_of_two_prompts()
    sched.postprocess([7])
    out = sched.schedule()
    batch = Batch.from_output(out)
    assert_batch_matches(batch, out)
    assert batch.input_ids.tolist() == [7] + PROMPT_B[6:]
    assert batch.positions.tolist() == [10, *range(6, 12)]
    assert batch.sample_indices.tolist() == [0, 6]
    assert (batch.num_decode_seqs, batch.max_seqlen_q, batch.max_context_len) == (1, 6, 12)


def test_batch_of_chunk_only_step_has_no_sample_indices():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(PROMPT_B, StopParams(max_tokens=2, ignore_eos=True))
    out = sched.schedule()
    assert out.num_sampled == 0
    batch = Batch.from_output(out)
    assert_batch_matches(batch, out)
    assert batch.sample_indices.dtype == torch.int32 and tuple(batch.sample_indices.shape) == (0,)
    assert batch.input_ids.tolist() == PROMPT_B[:8]
    assert batch.context_lens.tolist() == [8]
    assert tuple(batch.block_tables.shape) == (1, 1)
    assert sched.postprocess(np.empty(0, dtype=np.int32)) == []
    out = sched.schedule()  # the rest of the prompt is sampled
    batch = Batch.from_output(out)
    assert (batch.input_ids.tolist(), batch.sample_indices.tolist()) == (PROMPT_B[8:], [3])


def test_batch_of_idle_step_is_empty():
    sched = make_scheduler()
    batch = Batch.from_output(sched.schedule())
    assert batch.cu_seqlens_q.tolist() == [0]
    for name in ("input_ids", "positions", "slot_mapping", "context_lens", "sample_indices"):
        assert tuple(getattr(batch, name).shape) == (0,), name
    assert tuple(batch.block_tables.shape) == (0, 0)
    assert (batch.num_decode_seqs, batch.max_seqlen_q, batch.max_context_len) == (0, 0, 0)


def test_batch_keeps_scheduler_alive():
    def batch_of_first_step() -> tuple[weakref.ref, Batch]:
        sched, out = first_step_of_two_prompts()
        return weakref.ref(sched), Batch.from_output(out)

    scheduler_ref, batch = batch_of_first_step()
    gc.collect()
    assert scheduler_ref() is not None
    assert batch.input_ids.tolist() == PROMPT_A + PROMPT_B[:6]
    assert batch.positions.tolist() == [*range(10), *range(6)]
    del batch
    gc.collect()
    assert scheduler_ref() is None


def test_staged_batch_is_a_copy_through_one_reused_buffer():
    """StepStaging (pinned on CUDA) on its CPU twin: each step's arena is copied, and the buffer
    grows only when a step is larger than any before it."""
    sched, out = first_step_of_two_prompts()
    staging = StepStaging(torch.device("cpu"))
    batch = Batch.from_output(out, staging=staging)
    assert_batch_matches(batch, out)
    assert not np.shares_memory(batch.input_ids.numpy(), out.arena)
    buffer = staging.host
    sched.postprocess([7])
    out = sched.schedule()  # a smaller step: same buffer
    batch = Batch.from_output(out, staging=staging)
    assert_batch_matches(batch, out)
    assert staging.host is buffer
