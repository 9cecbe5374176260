"""A two-turn conversation through the model's chat template, the second answer streamed."""

import sys

from professional_nano_llm import ProfessionalLLM, SamplingParams

llm = ProfessionalLLM(sys.argv[1] if len(sys.argv) > 1 else None)
params = SamplingParams(temperature=0, max_tokens=48)
messages = [{"role": "user", "content": "Name a planet in our solar system."}]
answer = llm.chat(messages, params, use_tqdm=False).text
print("assistant:", answer)
messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "How big is it?"}]
print("assistant: ", end="")
for piece in llm.stream(messages, params):
    print(piece, end="", flush=True)
print()
