"""Servers of their own: admission control (429), SIGTERM drain (exit 0), engine failure (exit != 0)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from server_testing import start_server

DRAIN_KEY = "sk-drain"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's servers, started together: a model load is single-threaded, so on two cores
    three loads take about as long as two. Each test waits for its own."""
    started = {
        # One sequence runs at a time and one may wait: the rest of a burst is refused at once.
        "overload": start_server(tmp_path_factory, "overload", "--max-waiting-requests", "1",
                                 "--max-num-seqs", "1"),
        "drain": start_server(tmp_path_factory, "drain", "--shutdown-timeout", "60", "--api-key", DRAIN_KEY,
                              "--metrics-auth"),
        # Step 1 is /ready's probe; steps 2-3 run the requests of the test, and step 4 raises.
        "fault": start_server(tmp_path_factory, "fault", "--log-format", "json",
                              env={"PNL_FAULT_INJECT_STEP": "4"}),
    }
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_overload_gets_429_with_retry_after_and_the_rest_completes(servers):
    server = servers["overload"]
    server.wait_ready()

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": f"Burst {i}", "max_tokens": 2,
                                                          "ignore_eos": True})

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted, statuses
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r in accepted)
    # Once the burst is over, requests are admitted again.
    after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Calm", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200


def test_metrics_auth_and_sigterm_drain_then_exit_0(servers):
    server = servers["drain"]
    server.wait_ready()
    auth = {"Authorization": f"Bearer {DRAIN_KEY}"}
    # --metrics-auth: /metrics needs the key; the probes never do.
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=auth, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200

    first_chunk = threading.Event()
    result: dict = {}

    def long_stream():
        body = {"prompt": "Count slowly:", "max_tokens": 32, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        frames = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth,
                          timeout=120) as response:
            result["status"] = response.status_code
            for line in response.iter_lines():
                if line:
                    frames.append(line)
                    first_chunk.set()
        result["frames"] = frames

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    assert first_chunk.wait(60), server.log()[-2000:]
    server.signal(signal.SIGTERM)

    # Draining: not ready, and new work is refused (until the listener closes).
    deadline = time.monotonic() + 10
    while True:
        try:
            ready = httpx.get(f"{server.url}/ready", timeout=10).status_code
        except httpx.TransportError:
            ready = "refused"
        if ready in (503, "refused"):
            break
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.05)
    try:
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "new", "max_tokens": 2},
                             headers=auth, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    except httpx.TransportError:
        pass  # already closed: also a refusal

    streamer.join(120)
    assert not streamer.is_alive()
    frames = result["frames"]
    assert result["status"] == 200 and frames[-1] == "data: [DONE]"
    usage = json.loads(frames[-2][6:])["usage"]
    assert usage["completion_tokens"] == 32  # the in-flight request finished in full
    assert server.wait_exit(60) == 0, server.log()[-2000:]
    assert "draining 1 request(s)" in server.log()


def test_engine_failure_fails_pending_requests_and_exits_nonzero(servers):
    server = servers["fault"]
    server.wait_ready()

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            plain = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 50, "ignore_eos": True})
            body = {"prompt": "Hi", "max_tokens": 50, "ignore_eos": True, "stream": True}

            async def streamed():
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    return response.status_code, [line async for line in response.aiter_lines() if line]

            return await asyncio.gather(plain, streamed())

    plain, (stream_status, frames) = asyncio.run(both())
    assert plain.status_code == 500, plain.text
    assert plain.json()["error"]["code"] == "engine_dead"
    assert stream_status == 200 and frames[-1] == "data: [DONE]"
    assert json.loads(frames[-2][6:])["error"]["code"] == "engine_dead"

    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    except httpx.TransportError:
        pass  # already gone
    assert server.wait_exit(30) != 0
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any("injected failure" in r.get("exception", "") for r in records)
    assert any(r.get("status") == 500 and r.get("request_id", "").startswith("cmpl-") for r in records)
