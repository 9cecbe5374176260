"""Complete a few prompts with the bundled model (or pass a model path as the first argument)."""

import sys

from professional_nano_llm import ProfessionalLLM, SamplingParams

llm = ProfessionalLLM(sys.argv[1] if len(sys.argv) > 1 else None)
prompts = ["The three primary colors are", "A haiku about autumn:\n"]
params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=32, seed=0)
for out in llm.generate(prompts, params):
    print(f"{out.prompt!r} -> {out.text!r} ({out.finish_reason}, {len(out.token_ids)} tokens)")
