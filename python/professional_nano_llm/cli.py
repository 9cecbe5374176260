"""`pnl`: generate text or chat from the command line (the bundled model unless --model is given)."""

from __future__ import annotations

import argparse
import sys

from professional_nano_llm import __version__


def _engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: bundled SmolLM2-135M)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--kv-cache-memory-gb", type=float, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _build_llm(args):
    from professional_nano_llm.llm import ProfessionalLLM

    engine_args = {
        key: getattr(args, key)
        for key in ("device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "kv_cache_memory_gb")
        if getattr(args, key) is not None
    }
    if args.no_prefix_caching:
        engine_args["enable_prefix_caching"] = False
    return ProfessionalLLM(args.model, **engine_args)


def _sampling_params(args):
    from professional_nano_llm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=args.stop, ignore_eos=args.ignore_eos,
    )


def _generate(args) -> int:
    params = _sampling_params(args)
    llm = _build_llm(args)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(list(args.prompts), params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outputs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text)
        print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0


def _chat(args) -> int:
    params = _sampling_params(args)
    llm = _build_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(messages, params):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pnl", description="Professional nano-vLLM")
    parser.add_argument("--version", action="version", version=f"professional-nano-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts and print the results")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    _engine_args(gen)
    _sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat, streaming the replies")
    chat.add_argument("--system", default=None, help="system prompt")
    _engine_args(chat)
    _sampling_args(chat)
    args = parser.parse_args(argv)
    try:
        return _generate(args) if args.command == "generate" else _chat(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"pnl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
