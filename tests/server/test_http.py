"""Raw HTTP against `pnl serve`: exact SSE framing, the error envelope and status codes, auth, probes."""

from __future__ import annotations

import json

import httpx
import pytest
from server_testing import API_KEYS, MAX_BODY_BYTES, metric, sse_frames

MODEL = "SmolLM2-135M-Instruct"


def assert_envelope(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("chat", [False, True])
def test_sse_framing_and_include_usage(client, chat):
    if chat:
        message = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
        path, body = "/v1/chat/completions", {"messages": [message]}
    else:
        path, body = "/v1/completions", {"prompt": "Hello"}
    body.update(max_tokens=5, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    response = client.post(path, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(response.content)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    *content, usage = chunks
    assert usage["choices"] == [] and all(c["usage"] is None for c in content)
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])


def test_stream_without_include_usage_has_no_usage(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    frames = sse_frames(response.content)
    assert frames[-1] == "[DONE]"
    assert all("usage" not in json.loads(f) for f in frames[:-1])


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": "hello " * 5000}, 400, "prompt"),
    ({"prompt": "hello " * 2000, "max_tokens": 4000}, 400, "max_tokens"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    ({"prompt": "x", "stop_token_ids": list(range(1025))}, 400, "stop_token_ids"),
    ({"prompt": "x", "user": "u" * 257}, 400, "user"),
    ({"prompt": ["x"] * 1025}, 400, "n"),
])
def test_bad_completion_requests(client, body, status, param):
    assert_envelope(client.post("/v1/completions", json=body), status, param=param)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_chat_requests(client, body, param):
    assert_envelope(client.post("/v1/chat/completions", json=body), 400, param=param)


def test_malformed_json_and_non_object_bodies(client):
    assert_envelope(client.post("/v1/completions", content=b'{"prompt": "x",'), 400, code="invalid_json")
    assert_envelope(client.post("/v1/chat/completions", content=b"\xff\xfe"), 400, code="invalid_json")
    assert_envelope(client.post("/v1/completions", json=["x"]), 400)
    assert_envelope(client.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}'), 400,
                    code="invalid_json")
    # 1e400 parses as infinity
    assert_envelope(client.post("/v1/completions", content=b'{"prompt": "x", "temperature": 1e400}'), 400,
                    param="temperature")
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # far past any recursion limit
    for path in ("/v1/completions", "/tokenize"):
        assert_envelope(client.post(path, content=deep), 400, code="invalid_json")
    for body in (b'{"prompt": "a\\ud800b"}', b'{"model": "\\ud800", "prompt": "x"}'):  # lone surrogates
        assert_envelope(client.post("/v1/completions", content=body), 400, code="invalid_json")


def test_null_means_the_default(client):
    """OpenAI's API takes null for optional fields; some SDKs send every field."""
    body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "n": None, "stream": None, "logprobs": None,
            "temperature": None, "stop": None, "seed": None, "user": None}
    out = client.post("/v1/completions", json=body).json()
    assert len(out["choices"]) == 1 and out["usage"]["completion_tokens"] == 2
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": None, "n": None}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert_envelope(client.post("/v1/completions", json={"prompt": None}), 400, param="prompt")
    assert_envelope(client.post("/v1/completions", json={"prompt": "x", "no_such_field": None}), 400,
                    param="no_such_field")


def test_prompt_too_long_names_the_numbers(client):
    error = assert_envelope(client.post("/v1/completions", json={"prompt": [1] * 2000, "max_tokens": 4000}), 400,
                            code="context_length_exceeded")
    assert "2000" in error["message"] and "4000" in error["message"] and "4656" in error["message"]


def test_unknown_model_is_404(client):
    error = assert_envelope(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404,
                            code="model_not_found", param="model")
    assert "gpt-9" in error["message"]


def test_unknown_field_is_400(client):
    error = assert_envelope(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": []}), 400, param="tools")
    assert "tools" in error["message"]


def test_body_over_the_limit_is_413(client):
    big = {"prompt": "x" * (MAX_BODY_BYTES + 1000)}
    assert_envelope(client.post("/v1/completions", json=big), 413, code="request_too_large")


def test_unknown_route_and_method(client):
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.get("/v1/completions"), 405)


def test_api_key_required_on_api_routes(server):
    routes = [("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}), ("GET", "/v1/models", None),
              ("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
              ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEYS[0]},
                    {"Authorization": f"Basic {API_KEYS[0]}"}):
        for method, path, body in routes:
            response = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert_envelope(response, 401, code="invalid_api_key")
    for key in API_KEYS:  # both keys from the comma-separated PNL_API_KEY work
        response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 200


def test_probes_and_metrics_need_no_key(server):
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("pnl:num_requests_running", "pnl:num_requests_waiting", "pnl:kv_cache_usage_perc",
                 "pnl:prefix_cache_queries_total", "pnl:prefix_cache_hits_total", "pnl:num_preemptions_total",
                 "pnl:prompt_tokens_total", "pnl:generation_tokens_total"):
        metric(text, name, model_name=MODEL)
    metric(text, "pnl:request_success_total", finished_reason="stop")
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        metric(text, f"pnl:{name}_count")
        metric(text, f"pnl:{name}_bucket", le="+Inf")


def test_tokenize_and_detokenize(client):
    out = client.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] == 4656
    assert client.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "Hello world"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > out["count"]  # the template adds the role markup
    assert_envelope(client.post("/tokenize", json={}), 400)
    assert_envelope(client.post("/tokenize", json={"prompt": "x", "messages": []}), 400)
    assert_envelope(client.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    assert_envelope(client.post("/detokenize", json={"tokens": "abc"}), 400, param="tokens")


def test_prompts_and_outputs_are_not_logged(server, client):
    secret = "zebra-unicorn-carburetor"
    response = client.post("/v1/completions", json={"prompt": f"Say {secret}", "max_tokens": 3,
                                                        "ignore_eos": True, "user": "tenant-42"})
    assert response.status_code == 200
    request_id = response.json()["id"]
    log = server.log()
    assert request_id in log  # one line per request ...
    assert secret not in log  # ... without the prompt
    line = next(line for line in log.splitlines() if request_id in line)
    assert "status=200" in line and "completion_tokens=3" in line and "ttft=" in line and "e2e=" in line
    assert "user=tenant-42" in line  # the OpenAI `user` field is honoured: it traces requests to end users
    forged = "x\nERROR request cmpl-forged status=200 user=admin"
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "user": forged})
    log = server.log()
    line = next(line for line in log.splitlines() if response.json()["id"] in line)
    assert "user=x\\nERROR request cmpl-forged" in line  # escaped on the request's own line
    assert not any(line.startswith("ERROR request cmpl-forged") for line in log.splitlines())


def test_server_is_healthy_after_bad_input(client):
    assert client.get("/health").status_code == 200
    out = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 2
