"""nano-vLLM's example.py, unchanged except for the import line.

    - from nanovllm import LLM, SamplingParams
    + from professional_nano_llm import LLM, SamplingParams
"""

import sys

from professional_nano_llm import LLM, SamplingParams


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else None  # nano-vLLM: os.path.expanduser("~/huggingface/Qwen3-0.6B/")
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)
    tokenizer = llm.tokenizer

    sampling_params = SamplingParams(temperature=0.6, max_tokens=64)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]
    outputs = llm.generate(prompts, sampling_params)

    for prompt, output in zip(prompts, outputs):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")


if __name__ == "__main__":
    main()
