"""One engine step's model inputs as torch tensors, built from a ScheduleOutput without copies."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from professional_nano_llm._C import ScheduleOutput


@dataclass(slots=True)
class Batch:
    """int32 tensors of one step; sequences with one new token (decodes) come first.

    On the CPU the tensors alias the scheduler's buffers: they are valid until the next
    ``schedule()``. With ``device`` set, the whole step moves in one copy (through ``staging``'s
    pinned buffer when given, so the copy is asynchronous).
    """

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens] KV slot = block * block_size + offset
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1]
    context_lens: torch.Tensor  # [num_seqs] tokens in the cache after this step
    sample_indices: torch.Tensor  # [num_sampled] token rows whose logits are sampled
    block_tables: torch.Tensor  # [num_seqs, max_blocks], padded with -1
    placeholder_rows: torch.Tensor  # [num_placeholders] input_ids rows the previous step samples
    placeholder_sources: torch.Tensor  # [num_placeholders] their rows among its sampled tokens
    num_decode_seqs: int
    max_seqlen_q: int
    max_context_len: int

    @classmethod
    def from_output(cls, out: ScheduleOutput, device: torch.device | None = None,
                    staging: StepStaging | None = None) -> Batch:
        arena = torch.from_numpy(out.arena)
        if staging is not None:
            arena = staging.upload(arena)
        elif device is not None and device.type != "cpu":
            arena = arena.to(device)
        ids, pos, slots, cu, ctx, sample, tables, placeholder_rows, placeholder_sources = arena.split(out.field_sizes)
        return cls(
            ids,
            pos,
            slots,
            cu,
            ctx,
            sample,
            tables.view(out.num_seqs, out.block_table_width),
            placeholder_rows,
            placeholder_sources,
            out.num_decode_seqs,
            out.max_seqlen_q,
            out.max_context_len,
        )


def fill_placeholders(input_ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor,
                      previous_tokens: torch.Tensor) -> None:
    """input_ids[rows] = previous_tokens[sources], on the device: the inputs of an overlapped step
    that the step before it samples (ScheduleOutput's placeholders). input_ids [T] int32; rows,
    sources [P] int32; previous_tokens [S] int64."""
    input_ids.index_copy_(0, rows.long(), previous_tokens.index_select(0, sources.long()).to(input_ids.dtype))


class StepStaging:
    """A pinned host buffer and its device twin, grown on demand and reused by every step, so moving
    a step's inputs (or its sampling parameters) allocates nothing and does not block the host."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.int32):
        self.device, self.dtype = device, dtype
        self.host = torch.empty(0, dtype=dtype)
        self.dev = torch.empty(0, dtype=dtype, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the last copy out of host

    def upload(self, values: torch.Tensor) -> torch.Tensor:  # [n] on the host -> [n] on the device
        n = values.numel()
        if n > self.host.numel():
            pin = self.device.type == "cuda"  # (a CPU twin, for tests, needs no pinning)
            self.host = torch.empty(max(n, 2 * self.host.numel()), dtype=self.dtype, pin_memory=pin)
            self.dev = torch.empty(self.host.numel(), dtype=self.dtype, device=self.device)
        # The previous copy may still be reading host: a step that samples nothing (a chunk of a
        # long prompt) returns without waiting for the device, so wait for that copy alone here.
        if self.copied is not None:
            self.copied.synchronize()
        self.host[:n].copy_(values)
        dev = self.dev[:n].copy_(self.host[:n], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return dev
