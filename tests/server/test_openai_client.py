"""The official openai client against `pnl serve`: completions and chat, plain and streaming."""

from __future__ import annotations

import openai
import pytest
from server_testing import API_KEYS

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEYS[1], timeout=60, max_retries=0) as c:
        yield c


def test_models_lists_the_served_model(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_streamed_equals_plain_and_usage_counts(oai, client):
    prompt = "The three primary colors are"
    plain = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                         stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == plain.choices[0].text and streamed

    prompt_tokens = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    generated = len(plain.choices[0].logprobs.tokens)  # one logprobs entry per generated token
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.completion_tokens == generated
    assert plain.usage.total_tokens == prompt_tokens + generated
    assert plain.usage.prompt_tokens_details.cached_tokens >= 0
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices)
    assert usage.completion_tokens == generated
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_streamed_equals_plain_and_usage_counts(oai, client):
    plain = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, logprobs=True)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert "Paris" in streamed
    assert plain.choices[0].message.role == "assistant"

    prompt_tokens = client.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert plain.usage.prompt_tokens == prompt_tokens == chunks[-1].usage.prompt_tokens
    assert plain.usage.completion_tokens == len(plain.choices[0].logprobs.content)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # The second identical conversation finds its prompt blocks in the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_chat_top_logprobs(oai):
    out = oai.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                      top_logprobs=3)
    for entry in out.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token


def test_prompt_list_and_n_give_one_choice_each(oai):
    out = oai.completions.create(model=MODEL, prompt=["Hello", "The sky is"], n=2, max_tokens=3, temperature=0.8,
                                 seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 4 * 3
    again = oai.completions.create(model=MODEL, prompt=["Hello", "The sky is"], n=2, max_tokens=3, temperature=0.8,
                                   seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeds seed+i per choice


def test_token_id_prompts_match_text_prompts(oai, client):
    ids = client.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_text = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    by_ids = oai.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(ids)


def test_stop_string_ends_the_completion(oai):
    out = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"])
    assert out.choices[0].finish_reason == "stop"
    assert " 6" not in out.choices[0].text and "5" in out.choices[0].text


def test_client_errors_surface_as_openai_exceptions(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    bad = openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
