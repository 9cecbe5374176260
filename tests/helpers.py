"""Test helpers shared across folders."""

from __future__ import annotations

import torch

from professional_nano_llm import ProfessionalLLM
from professional_nano_llm.engine import StopParams


def our_last_logits(llm: ProfessionalLLM, prompt: list[int]) -> torch.Tensor:
    """Logits the model runner produces for the prompt's last token, from one scheduled step."""
    engine = llm.engine
    seq_id = engine.scheduler.add(prompt, StopParams())
    out = engine.scheduler.schedule()
    try:
        return engine.runner.run(out)[0]
    finally:
        engine.scheduler.postprocess([0] * out.num_sampled)
        engine.scheduler.abort(seq_id)
