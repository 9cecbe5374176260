"""Many clients at once: continuous batching, exact token counts, metrics, and aborts on disconnect."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
from server_testing import metric

MODEL = "SmolLM2-135M-Instruct"


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def wait_idle(url: str, timeout: float = 20.0, aborted: float | None = None) -> str:
    """Waits until no request runs or waits and no KV block is used (and, if given, the abort counter
    has reached `aborted`); returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        idle = (metric(text, "pnl:kv_cache_usage_perc") == 0 and metric(text, "pnl:num_requests_running") == 0
                and metric(text, "pnl:num_requests_waiting") == 0)
        if idle and (aborted is None or aborts(text) >= aborted):
            return text
        assert time.monotonic() < deadline, f"engine not idle after {timeout} s:\n{text}"
        time.sleep(0.1)


def aborts(text: str) -> float:
    return metric(text, "pnl:request_success_total", finished_reason="abort")


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, str, bool]:
    """(completion_tokens from the usage chunk, finish_reason, saw [DONE])."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7, "seed": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    usage, finish, done = None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    return usage["completion_tokens"], finish, done


def test_64_concurrent_streams_get_exact_token_counts(server, auth):
    before = wait_idle(server.url)
    max_tokens = [1 + i % 6 for i in range(64)]
    prompts = [f"Request number {i} says" for i in range(64)]

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream_completion(client, p, m) for p, m in zip(prompts, max_tokens)))

    results = asyncio.run(run())
    assert [r[0] for r in results] == max_tokens
    assert all(finish == "length" and done for _, finish, done in results)

    after = wait_idle(server.url)
    diff = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert diff("pnl:generation_tokens_total") == sum(max_tokens)
    assert diff("pnl:request_success_total", finished_reason="length") == 64
    assert diff("pnl:request_success_total", finished_reason="stop") == 0
    assert diff("pnl:request_success_total", finished_reason="abort") == 0
    prompt_tokens = sum(httpx.post(f"{server.url}/tokenize", json={"prompt": p}, headers=auth).json()["count"]
                        for p in prompts)
    assert diff("pnl:prompt_tokens_total") == prompt_tokens
    assert diff("pnl:time_to_first_token_seconds_count") == 64
    assert diff("pnl:e2e_request_latency_seconds_count") == 64
    assert diff("pnl:request_queue_time_seconds_count") == 64
    assert diff("pnl:inter_token_latency_seconds_count") == sum(m - 1 for m in max_tokens)


def test_32_streams_disconnecting_midway_are_aborted(server, auth):
    before = wait_idle(server.url)

    async def start_and_leave(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    return  # leaving the block closes the connection mid-stream

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120, limits=limits) as client:
            await asyncio.gather(*(start_and_leave(client, i) for i in range(32)))

    asyncio.run(run())
    # 32 x 400 tokens would take minutes here: idle within seconds means they were aborted.
    after = wait_idle(server.url, timeout=20, aborted=aborts(before) + 32)
    assert aborts(after) - aborts(before) == 32
    assert metric(after, "pnl:generation_tokens_total") - metric(before, "pnl:generation_tokens_total") < 32 * 400
    out = httpx.post(f"{server.url}/v1/completions", headers=auth, timeout=60,
                     json={"prompt": "Still there?", "max_tokens": 3, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_that_gives_up_is_aborted(server, auth):
    before = wait_idle(server.url)
    body = {"prompt": "A very long story:", "max_tokens": 2000, "ignore_eos": True}
    try:
        httpx.post(f"{server.url}/v1/completions", headers=auth, json=body, timeout=2.0)
        raise AssertionError("2000 tokens in 2 s: the test cannot tell an abort from completion")
    except httpx.ReadTimeout:
        pass  # the client closes the connection
    after = wait_idle(server.url, timeout=20, aborted=aborts(before) + 1)
    assert aborts(after) - aborts(before) == 1


def test_idle_engine_does_not_spin(server):
    wait_idle(server.url)
    time.sleep(0.5)  # let the last step's bookkeeping settle

    def cpu_seconds() -> float:  # user + system time of all the server's threads
        fields = open(f"/proc/{server.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - before < 0.2  # the engine thread sleeps on its command queue
