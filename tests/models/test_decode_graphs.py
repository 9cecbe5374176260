"""Decode CUDA graphs' host side, on the CPU: bucket choice, and that the padded static inputs a
graph replays give the real rows exactly the logits of the plain step."""

from __future__ import annotations

import pytest
import torch

from professional_nano_llm import ProfessionalLLM
from professional_nano_llm.engine import StopParams
from professional_nano_llm.engine.cuda_graphs import DecodeGraphs, bucket_for, graph_batch_sizes


def test_buckets_cover_every_batch_size():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(100)[-1] == 100 and graph_batch_sizes(5000)[-1] == 512
    sizes = graph_batch_sizes(100)
    for n in range(1, 101):
        b = bucket_for(n, sizes)
        assert b >= n and all(s < n for s in sizes if s < b)  # the smallest bucket that fits
    assert bucket_for(101, sizes) is None


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_padded_decode_step_matches_the_plain_step(tiny_models, arch):
    llm = ProfessionalLLM(str(tiny_models[arch][0]), block_size=8, max_num_seqs=8, enable_prefix_caching=False)
    engine = llm.engine
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30)]  # 1, 3 and 4 blocks of 8
    seq_ids = [engine.scheduler.add(p, StopParams(max_tokens=8, ignore_eos=True)) for p in prompts]
    out = engine.scheduler.schedule()
    engine.scheduler.postprocess([7, 8, 9])
    out = engine.scheduler.schedule()
    try:
        graphs = DecodeGraphs(engine.runner.decode_forward, 8, max_blocks=40, device=torch.device("cpu"),
                              capture=False)
        assert graphs.covers(out) and out.num_seqs == 3  # replayed in the bucket of 4: one padding row
        plain = engine.runner.run(out)
        padded = engine.runner.model.compute_logits(graphs.run(out))
        torch.testing.assert_close(padded, plain, atol=1e-4, rtol=1e-5)
        assert (graphs.inputs.views(4)[2][3] == -1).all()  # the padding row stores no KV
    finally:
        engine.scheduler.postprocess([0] * out.num_sampled)
        for s in seq_ids:
            engine.scheduler.abort(s)


def test_prefill_steps_are_not_replayed(tiny_models):
    llm = ProfessionalLLM(str(tiny_models["llama"][0]), max_num_seqs=4)
    engine = llm.engine
    seq_id = engine.scheduler.add([1, 2, 3], StopParams(max_tokens=2))
    out = engine.scheduler.schedule()
    try:
        graphs = DecodeGraphs(engine.runner.decode_forward, 4, 8, torch.device("cpu"), capture=False)
        assert not graphs.covers(out)
    finally:
        engine.scheduler.postprocess([0] * out.num_sampled)
        engine.scheduler.abort(seq_id)


def test_an_overlapped_decode_step_reads_the_pending_tokens_in_both_paths(tiny_models):
    """Scheduled while the prefill is pending, the decode step has placeholders for the tokens the
    prefill samples: the plain and the padded (graph) paths read them from the device tokens, and
    compute what the step scheduled after the tokens were known computes."""
    path = str(tiny_models["qwen3"][0])
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30)]
    pending = torch.tensor([7, 8, 9])

    def engine_with_prefill_run():
        engine = ProfessionalLLM(path, block_size=8, max_num_seqs=8, enable_prefix_caching=False).engine
        for p in prompts:
            engine.scheduler.add(p, StopParams(max_tokens=8, ignore_eos=True))
        engine.runner.run(engine.scheduler.schedule())
        return engine

    lockstep = engine_with_prefill_run()
    lockstep.scheduler.postprocess(pending.tolist())
    want = lockstep.runner.run(lockstep.scheduler.schedule())

    engine = engine_with_prefill_run()
    out = engine.scheduler.schedule()  # the prefill is still pending
    assert out.num_placeholders == 3 and (out.input_ids == 0).all()
    assert out.placeholder_sources.tolist() == [0, 1, 2]
    graphs = DecodeGraphs(engine.runner.decode_forward, 8, max_blocks=40, device=torch.device("cpu"), capture=False)
    assert graphs.covers(out)
    plain = engine.runner.run(out, pending)
    padded = engine.runner.model.compute_logits(graphs.run(out, pending))
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, want, atol=1e-4, rtol=1e-5)
