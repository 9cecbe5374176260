"""`pnl`: generate text, chat, or serve the OpenAI API (the bundled model unless one is given)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from professional_nano_llm import __version__


def _version() -> str:
    from professional_nano_llm import ops

    return (f"professional-nano-llm {__version__}\n"
            f"CPU kernels: {ops.cpu_isa()} (this CPU runs: {', '.join(ops.supported_cpu_isas())})")


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
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--no-async-scheduling", action="store_true",
                   help="plan each step only once the one before has finished (default: overlap on a GPU)")


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


def _engine_kwargs(args) -> dict:
    engine_args = {
        key: getattr(args, key)
        for key in ("device", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
                    "kv_cache_memory_gb", "gpu_memory_utilization")
        if getattr(args, key) is not None
    }
    if args.no_prefix_caching:
        engine_args["enable_prefix_caching"] = False
    if args.enforce_eager:
        engine_args["enforce_eager"] = True
    if args.no_async_scheduling:
        engine_args["async_scheduling"] = False
    return engine_args


def _build_llm(args):
    from professional_nano_llm.llm import ProfessionalLLM

    return ProfessionalLLM(args.model, **_engine_kwargs(args))


class _Repeatable(argparse.Action):
    """A repeatable flag whose first use on the command line replaces the default (e.g. from PNL_*)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else items
        setattr(namespace, self.dest, [*items, values])


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="same as --model")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action=_Repeatable, default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (repeatable; "
                        "PNL_API_KEY takes a comma-separated list)")
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="requests waiting to be scheduled before new ones get 429 (default: unbounded)")
    g.add_argument("--max-waiting-tokens", type=int, default=None,
                   help="prompt tokens waiting to be scheduled before new requests get 429 (default: unbounded)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests get to finish (default 30)")
    g.add_argument("--log-format", default="text", choices=["text", "json"])
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413 (default 4 MiB)")
    g.add_argument("--metrics-auth", action="store_true", help="/metrics requires the API key too")


def _apply_env(parser: argparse.ArgumentParser, prefix: str = "PNL_") -> None:
    """Every --flag defaults to the environment variable PNL_FLAG (dashes as underscores); the
    command line wins. Switches take 1/true/yes/on; PNL_API_KEY is a comma-separated list."""
    defaults = {}
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help":
            continue
        name = prefix + flags[0][2:].replace("-", "_").upper()
        raw = os.environ.get(name)
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, _Repeatable):
            value = [v.strip() for v in raw.split(",") if v.strip()]
        else:
            try:
                value = action.type(raw) if action.type else raw
            except ValueError:
                parser.error(f"{name}={raw!r} is not a valid {flags[0]}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        defaults[action.dest] = value
    parser.set_defaults(**defaults)


def _serve(args) -> int:
    from professional_nano_llm.server.api_server import ServerConfig, run_server

    from_cli = args.model is not None and args.model != os.environ.get("PNL_MODEL")  # not just PNL_MODEL
    if args.model_arg is not None and from_cli and args.model_arg != args.model:
        raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
    for name in ("max_waiting_requests", "max_waiting_tokens", "max_body_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.metrics_auth and not args.api_key:
        raise ValueError("--metrics-auth needs --api-key")
    fault = os.environ.get("PNL_FAULT_INJECT_STEP")  # test hook: engine step N raises
    config = ServerConfig(
        model=args.model_arg or args.model, engine_args=_engine_kwargs(args), host=args.host, port=args.port,
        api_keys=args.api_key or [], served_model_name=args.served_model_name,
        max_waiting_requests=args.max_waiting_requests, max_waiting_tokens=args.max_waiting_tokens,
        shutdown_timeout=args.shutdown_timeout, log_format=args.log_format, max_body_bytes=args.max_body_bytes,
        metrics_auth=args.metrics_auth, fault_inject_step=int(fault) if fault else None,
    )
    code = run_server(config)
    # The server has drained and shut down; skip the interpreter's slow teardown of torch and the
    # model (seconds), which also guarantees that no leftover thread keeps the process alive.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    # Raw text: the version's two lines stay two lines.
    parser = argparse.ArgumentParser(prog="pnl", description="Professional nano-vLLM",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
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
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (every --flag also reads PNL_<FLAG>)")
    _serve_args(serve)
    _engine_args(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":  # PNL_* defaults apply to serve only; parse again with them
        _apply_env(serve)
        args = parser.parse_args(argv)
    try:
        return {"generate": _generate, "chat": _chat, "serve": _serve}[args.command](args)
    except (ValueError, TypeError, OSError) as e:  # OSError: missing files, hub and network errors
        print(f"pnl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
