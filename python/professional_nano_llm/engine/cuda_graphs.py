"""CUDA graphs for decode steps.

A decode step launches a few hundred small kernels; replaying them as one captured graph removes
the launch gaps that dominate small batches. One graph is captured per batch-size bucket over
static input buffers whose block tables are as wide as max_model_len allows, so every batch size up
to the largest bucket and every context length is covered. A step of n decodes replays the
smallest bucket >= n; the extra rows are padding: their KV slot is -1 (nothing is stored) and they
attend to one token of block 0, so they read valid memory, and their outputs are dropped.
"""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np
import torch

from professional_nano_llm.engine.batch import fill_placeholders

_LARGEST_BUCKET = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, 8, then every 16 up to max_num_seqs (at most 512), which is always included."""
    top = min(max_num_seqs, _LARGEST_BUCKET)
    sizes = {s for s in (1, 2, 4, 8, *range(16, top + 1, 16)) if s <= top}
    return sorted(sizes | {top})


def bucket_for(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding num_seqs rows, or None when the step is too large for any."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeInputs:
    """The static, padded inputs of a decode step: one int32 buffer on the host (pinned on CUDA) and
    its device twin, so a step moves in one copy. Fields: input_ids, positions, slot_mapping,
    context_lens [max_seqs] and block_tables [max_seqs, max_blocks]."""

    def __init__(self, max_seqs: int, max_blocks: int, device: torch.device):
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        size = max_seqs * (4 + max_blocks)
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.dev = self.host if device.type == "cpu" else torch.zeros(size, dtype=torch.int32, device=device)
        self._host_fields = self._fields(self.host.numpy())
        self.fields = self._fields(self.dev)

    def _fields(self, buf):
        n = self.max_seqs
        ids, pos, slots, ctx, tables = (buf[i * n:(i + 1) * n] for i in range(5))
        tables = buf[4 * n:].reshape(n, self.max_blocks)
        return ids, pos, slots, ctx, tables

    def load(self, out, num_rows: int) -> None:
        """Writes a decode-only ScheduleOutput padded to num_rows rows, then starts the copy."""
        n, width = out.num_seqs, out.block_table_width
        ids, pos, slots, ctx, tables = self._host_fields
        ids[:n], pos[:n], slots[:n], ctx[:n] = out.input_ids, out.positions, out.slot_mapping, out.context_lens
        tables[:n, :width] = out.block_tables
        tables[:n, width:] = -1
        ids[n:num_rows], pos[n:num_rows], slots[n:num_rows], ctx[n:num_rows] = 0, 0, -1, 1
        tables[n:num_rows] = np.int32(-1)
        tables[n:num_rows, 0] = 0
        if self.dev is not self.host:  # the four [max_seqs] fields, then only the tables' used rows
            used = 4 * self.max_seqs + num_rows * self.max_blocks
            self.dev[:used].copy_(self.host[:used], non_blocking=True)

    def views(self, num_rows: int) -> tuple[torch.Tensor, ...]:
        """input_ids, positions, slot_mapping, context_lens [num_rows], block_tables [num_rows, max_blocks]."""
        return tuple(f[:num_rows] for f in self.fields)


class DecodeGraphs:
    """Captured decode forwards, one per bucket; `forward(ids, pos, slots, ctx, tables)` -> hidden [B, hidden].

    With capture=False the padded static inputs run eagerly, which is how the CPU tests check the
    padding.
    """

    def __init__(self, forward: Callable[..., torch.Tensor], max_num_seqs: int, max_blocks: int,
                 device: torch.device, capture: bool = True):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.inputs = DecodeInputs(self.sizes[-1], max_blocks, device)
        self.forward = forward
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def covers(self, out) -> bool:
        return out.num_tokens == out.num_seqs == out.num_decode_seqs > 0 and out.num_seqs <= self.sizes[-1]

    def run(self, out, previous_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [num_seqs, hidden] of a decode-only step (see covers); previous_tokens: what the
        step before sampled, for the inputs it leaves to the device (ModelRunner.run)."""
        rows = bucket_for(out.num_seqs, self.sizes)
        self.inputs.load(out, rows)
        if out.num_placeholders:
            device = self.inputs.dev.device
            fill_placeholders(self.inputs.fields[0], torch.from_numpy(out.placeholder_rows).to(device),
                              torch.from_numpy(out.placeholder_sources).to(device), previous_tokens)
        if rows in self.graphs:
            graph, hidden = self.graphs[rows]
            graph.replay()
        else:
            hidden = self.forward(*self.inputs.views(rows))
        return hidden[: out.num_seqs]

    def _capture_all(self) -> None:
        # Largest first: the smaller graphs then fit in the memory pool the largest one left.
        pool = None
        for rows in reversed(self.sizes):
            ids, positions, slots, context_lens, tables = views = self.inputs.views(rows)
            slots.fill_(-1)  # every row is a padding row: no KV stored, one token of block 0 read
            context_lens.fill_(1)
            tables.fill_(-1)
            tables[:, 0] = 0
            self.forward(*views)  # warm-up outside the graph: lazy initialisation, autotuning
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(*views)
            pool = graph.pool()
            self.graphs[rows] = (graph, hidden)
        torch.cuda.synchronize()
