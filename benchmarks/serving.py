"""Online serving benchmark: load an OpenAI-compatible server and measure latency and throughput.

Sends streaming /v1/completions requests to the base URL given (and nowhere else), either with Poisson
arrivals (--rate, requests/s) or with a fixed number in flight (--concurrency), and reports time to first
token (TTFT), inter-token latency per streamed chunk (ITL), time per output token after the first (TPOT),
end-to-end latency (p50/p99), requests/s and output tokens/s. Token counts come from the server's usage
(stream_options.include_usage). It starts no server itself.

Prompts are random text from a fixed word list (seeded, so every run sends the same requests; any
tokenizer works, so --prompt-len counts words, and the table shows the prompt tokens the server
reported), or random token ids with --prompt-type ids (a list of ints as the completions prompt, for
servers that accept it; --vocab-size bounds the ids). Requests ask for greedy decoding and
`ignore_eos` so each produces exactly its output length; a server that rejects these extra fields
gets requests without them (the table says so).

Against `pnl serve` (in one terminal, then wait until http://127.0.0.1:8000/ready answers 200):
    pnl serve --host 127.0.0.1 --port 8000 --kv-cache-memory-gb 0.2
    python benchmarks/serving.py --concurrency 8 --num-requests 32 --output-len 32..64
    python benchmarks/serving.py --rate 4 --num-requests 200 --prompt-len 128..512
Any other server: --base-url http://HOST:PORT/v1 [--api-key KEY] [--model NAME].

The last line printed is one JSON object for comparing runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be has or had not "
    "but first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made american however also this season film "
    "team music people part three well under between while through both called since series river water "
    "house number system early being government village music history light north south east west small "
    "large company group game album song station member center area family public local work still night"
).split()


@dataclass
class Request:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = math.nan
    e2e: float = math.nan
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0


@dataclass
class Features:
    """What the server accepted in the probe request."""
    ignore_eos: bool = True
    include_usage: bool = True
    usage_reported: bool = True


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("..")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected N or MIN..MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def make_requests(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.num_requests):
        n = rng.randint(*args.prompt_len)
        if args.prompt_type == "ids":
            prompt: str | list[int] = [rng.randrange(100, args.vocab_size) for _ in range(n)]
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(n))
        requests.append(Request(prompt, rng.randint(*args.output_len)))
    return requests


def request_body(model: str, req: Request, features: Features) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True}
    if features.include_usage:
        body["stream_options"] = {"include_usage": True}
    if features.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; not part of OpenAI's API
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> Result:
    result = Result(start=time.perf_counter())
    try:
        await asyncio.wait_for(_stream(client, url, body, result), timeout)
    except asyncio.TimeoutError:
        result.error = f"no complete response within {timeout:g} s"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _stream(client: httpx.AsyncClient, url: str, body: dict, result: Result) -> None:
    last = result.start
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            result.error = f"HTTP {response.status_code}: {text[:300]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"error event: {chunk['error']}"
                return
            if chunk.get("usage"):
                result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                result.completion_tokens = chunk["usage"].get("completion_tokens", 0)
            if any(c.get("text") for c in chunk.get("choices") or []):
                now = time.perf_counter()
                if result.chunks == 0:
                    result.ttft = now - result.start
                else:
                    result.itls.append(now - last)
                last = now
                result.chunks += 1
    result.e2e = time.perf_counter() - result.start
    result.ok = result.chunks > 0 or result.completion_tokens > 0
    if not result.ok:
        result.error = "the stream ended without any text"


async def probe(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int],
                timeout: float) -> Features:
    """One short request (also the warm-up); drops the extra fields the server rejects."""
    errors = []
    for ignore_eos, include_usage in [(True, True), (False, True), (True, False), (False, False)]:
        features = Features(ignore_eos, include_usage)
        result = await send(client, url, request_body(model, Request(prompt, 4), features), timeout)
        if result.ok:
            features.usage_reported = include_usage and result.completion_tokens > 0
            return features
        errors.append(result.error)
        if not result.error.startswith(("HTTP 400", "HTTP 422")):
            break  # not a rejected field: retrying without one will not help
    raise SystemExit(f"serving.py: the probe request to {url} failed: {errors[-1]}")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy.percentile."""
    if not values:
        return math.nan
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


async def run_load(client: httpx.AsyncClient, url: str, model: str, requests: list[Request],
                   features: Features, args: argparse.Namespace) -> tuple[list[Result], float]:
    bodies = [request_body(model, r, features) for r in requests]
    start = time.perf_counter()
    if args.rate is not None:
        rng = random.Random(args.seed + 1)
        tasks, t = [], 0.0
        for body in bodies:
            delay = start + t - time.perf_counter()  # arrival times are absolute: no drift from slow sends
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, url, body, args.request_timeout)))
            t += rng.expovariate(args.rate)
        results = list(await asyncio.gather(*tasks))
    else:
        queue = iter(enumerate(bodies))
        results = [Result()] * len(bodies)

        async def worker() -> None:
            for i, body in queue:
                results[i] = await send(client, url, body, args.request_timeout)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float, features: Features) -> dict:
    ok = [r for r in results if r.ok]
    count = (lambda r: r.completion_tokens) if features.usage_reported else (lambda r: r.chunks)
    output_tokens = sum(count(r) for r in ok)
    tpots = [(r.e2e - r.ttft) / (count(r) - 1) for r in ok if count(r) > 1]
    series = {
        "ttft_ms": [r.ttft * 1e3 for r in ok],
        "itl_ms": [x * 1e3 for r in ok for x in r.itls],
        "tpot_ms": [x * 1e3 for x in tpots],
        "e2e_s": [r.e2e for r in ok],
    }
    summary = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "prompt_throughput": sum(r.prompt_tokens for r in ok) / duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens_counted_by": "usage" if features.usage_reported else "chunks",
    }
    for name, values in series.items():
        summary[f"mean_{name}"] = sum(values) / len(values) if values else math.nan
        summary[f"p50_{name}"] = percentile(values, 50)
        summary[f"p99_{name}"] = percentile(values, 99)
    return summary


def print_table(summary: dict, results: list[Result], header: str) -> None:
    print(header)
    print(f"requests: {summary['completed']} completed, {summary['failed']} failed, "
          f"{summary['duration_s']:.2f} s")
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"first error: {errors[0]}")
    print(f"{'metric':24} {'mean':>9} {'p50':>9} {'p99':>9}")
    for name, label in [("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL per chunk (ms)"), ("tpot_ms", "TPOT (ms)"),
                        ("e2e_s", "end-to-end (s)")]:
        print(f"{label:24} {summary[f'mean_{name}']:9.2f} {summary[f'p50_{name}']:9.2f} "
              f"{summary[f'p99_{name}']:9.2f}")
    print(f"{'requests/s':24} {summary['request_throughput']:9.2f}")
    print(f"{'output tokens/s':24} {summary['output_throughput']:9.1f}   "
          f"({summary['total_output_tokens']} tokens, counted by {summary['output_tokens_counted_by']})")
    if summary["output_tokens_counted_by"] == "usage":
        print(f"{'prompt tokens/s':24} {summary['prompt_throughput']:9.1f}   "
              f"({summary['total_prompt_tokens']} tokens)")
    else:
        print(f"{'prompt tokens/s':24} {'n/a':>9}   (the server reports no usage)")


async def amain(args: argparse.Namespace) -> int:
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connections = args.concurrency if args.rate is None else args.max_connections
    timeout = httpx.Timeout(connect=10.0, read=args.request_timeout, write=30.0, pool=args.request_timeout)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False,
                                 limits=httpx.Limits(max_connections=connections,
                                                     max_keepalive_connections=connections)) as client:
        model = args.model
        if model is None:
            try:
                response = await client.get(f"{base}/models")
                response.raise_for_status()
                model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                raise SystemExit(f"serving.py: cannot list the models at {base}/models "
                                 f"({str(e).splitlines()[0]}); pass --model")
        url = f"{base}/completions"
        requests = make_requests(args)
        warmup = list(range(100, 116)) if args.prompt_type == "ids" else " ".join(WORDS[:16])
        features = await probe(client, url, model, warmup, args.request_timeout)
        results, duration = await run_load(client, url, model, requests, features, args)

    summary = summarize(results, duration, features)
    mode = f"rate {args.rate:g} req/s (Poisson)" if args.rate is not None else f"concurrency {args.concurrency}"
    lo, hi = args.prompt_len
    olo, ohi = args.output_len
    header = (f"serving benchmark: {base}, model {model}, {mode}, {args.num_requests} requests, "
              f"prompts {lo}..{hi} {'words' if args.prompt_type == 'text' else 'token ids'}, "
              f"outputs {olo}..{ohi} tokens, seed {args.seed}\n"
              f"streaming /completions, greedy, ignore_eos {'sent' if features.ignore_eos else 'REJECTED: not sent'}, "
              f"include_usage {'sent' if features.include_usage else 'REJECTED: not sent'}")
    print_table(summary, results, header)
    summary.update(base_url=base, model=model, mode="rate" if args.rate is not None else "concurrency",
                   rate=args.rate, concurrency=None if args.rate is not None else args.concurrency,
                   num_requests=args.num_requests, prompt_len=list(args.prompt_len),
                   output_len=list(args.output_len), prompt_type=args.prompt_type, seed=args.seed,
                   ignore_eos=features.ignore_eos, include_usage=features.include_usage)
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}))
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="(default: %(default)s)")
    parser.add_argument("--model", default=None, help="default: the first model in /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="sent as a Bearer token (default: $OPENAI_API_KEY)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests per second")
    mode.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--prompt-len", type=parse_range, default=(64, 256), metavar="N|MIN..MAX",
                        help="prompt length in words (text) or token ids (default: 64..256)")
    parser.add_argument("--output-len", type=parse_range, default=(64, 128), metavar="N|MIN..MAX",
                        help="max_tokens per request (default: 64..128)")
    parser.add_argument("--prompt-type", choices=["text", "ids"], default="text", help="(default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="--prompt-type ids draws ids from 100..N-1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds one request may take in all (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=512,
                        help="connection pool size in --rate mode (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.concurrency < 1 or args.num_requests < 1:
        parser.error("--concurrency and --num-requests must be >= 1")
    if args.prompt_type == "ids" and args.vocab_size <= 100:
        parser.error("--vocab-size must be > 100")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
