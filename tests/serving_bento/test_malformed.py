"""A corpus of malformed requests: each gets a 4xx with a clear message; the service keeps serving.

The tiny server runs with tight limits (64 prompt tokens, 32 new tokens, 4 KiB bodies) and an API
key, so every limit is reachable with small bodies.
"""

from __future__ import annotations

import json

import httpx
import pytest

M = "tiny-with-adapters"
MSG = [{"role": "user", "content": "hi"}]
LONG_PROMPT = " ".join(["Kubernetes runs"] * 40)  # > 64 tokens, < 1024 characters (16 x 64)

# (path, body: dict → JSON, bytes → sent as is, expected status, text the message must contain)
CORPUS: list[tuple[str, object, int, str]] = [
    ("/chat", b"{not json", 400, "not valid JSON"),
    ("/chat", b"", 400, "not valid JSON"),
    ("/chat", b"\xff\xfe\x00", 400, "not valid JSON"),
    ("/chat", b"[1, 2, 3]", 400, "JSON object"),
    ("/chat", b'"just a string"', 400, "JSON object"),
    ("/chat", {}, 400, "exactly one of prompt or messages"),
    ("/chat", {"prompt": "hi", "messages": MSG}, 400, "exactly one of prompt or messages"),
    ("/chat", {"prompt": 42}, 400, "prompt"),
    ("/chat", {"prompt": ""}, 400, "prompt"),
    ("/chat", {"prompt": None, "messages": []}, 400, "messages"),
    ("/chat", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/chat", {"messages": "hi"}, 400, "messages"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"temperature": "hot"}}, 400, "generate_kwargs.temperature"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"temperature": -1}}, 400, "generate_kwargs.temperature"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"top_p": 0}}, 400, "generate_kwargs.top_p"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_new_tokens": "10"}}, 400, "generate_kwargs.max_new_tokens"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_new_tokens": 0}}, 400, "generate_kwargs.max_new_tokens"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_new_tokens": 100000}}, 400, "more than this service allows"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"max_length": 1}}, 400, "generate_kwargs.max_length"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"num_beams": 4}}, 400, "generate_kwargs.num_beams"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"frobnicate": True}}, 400, "generate_kwargs.frobnicate"),
    ("/chat", {"prompt": "hi", "generate_kwargs": "fast"}, 400, "generate_kwargs"),
    ("/chat", {"prompt": "hi", "adapter": "nope"}, 404, "adapter: 'nope' is not served here"),
    ("/chat", {"prompt": "x" * 2000}, 400, "2000 characters; the limit is 1024"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"seed": 2**64}}, 400, "generate_kwargs.seed"),
    ("/chat", {"prompt": "hi", "generate_kwargs": {"seed": -(2**63) - 1}}, 400, "generate_kwargs.seed"),
    ("/chat", b'{"prompt": "hi", "generate_kwargs": {"temperature": NaN}}', 400, "generate_kwargs.temperature"),
    ("/chat", b'{"prompt": "hi", "generate_kwargs": {"top_p": Infinity}}', 400, "generate_kwargs.top_p"),
    ("/chat", b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400, "nested too deeply"),
    ("/chat", {"prompt": LONG_PROMPT}, 400, "the limit is 64"),
    ("/chat", {"prompt": "x" * 5000}, 413, "limit"),
    ("/v1/chat/completions", {"messages": MSG}, 400, "model"),
    ("/v1/chat/completions", {"model": "other-model", "messages": MSG}, 404, "not served here"),
    ("/v1/chat/completions", {"model": M, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": M}, 400, "messages"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "max_tokens": 1000}, 400, "more than this service allows"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "stop": ["x" * 129]}, 400, "at most 128 characters"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "seed": 2**64}, 400, "seed"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools: tool calling is not supported"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "response_format": {"type": "json_object"}},
     400, "response_format: structured output"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "audio": {"voice": "alloy"}}, 400, "audio"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "logit_bias": {"42": 5}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": M, "messages": MSG, "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/chat/completions", {"model": M, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}, 400, "tool and function call messages"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages.0.content"),
    ("/v1/completions", {"model": M}, 400, "prompt"),
    ("/v1/completions", {"model": M, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": M, "prompt": LONG_PROMPT}, 400, "the limit is 64"),
    ("/v1/completions", {"model": M, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"model": M, "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": "adapter-that-does-not-exist", "prompt": "hi"}, 404, "not served here"),
]


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize(("path", "body", "status", "fragment"), CORPUS,
                         ids=[f"{i:02d}{p.replace('/', '_')}" for i, (p, *_) in enumerate(CORPUS)])
def test_malformed_request_is_a_clear_4xx(bento_tiny, path, body, status, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(bento_tiny.url + path, content=content, timeout=30,
                   headers={**bento_tiny.headers(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_neutral_openai_parameters_are_accepted(bento_tiny):
    """What clients send by default (zero penalties, a user id, empty logit_bias) changes nothing: accepted."""
    r = httpx.post(bento_tiny.url + "/v1/chat/completions", headers=bento_tiny.headers(), timeout=30, json={
        "model": M, "messages": MSG, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logit_bias": {}, "user": "u-1", "logprobs": False, "tools": None, "n": 1, "modalities": ["text"]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [
    b'{"prompt": "hi", "generate_kwargs": {"seed": ' + b"7" * 5000 + b"}}",  # over Python's 4300-digit limit
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
])
def test_huge_numbers_and_deep_nesting_are_400_not_500(bento_tiny_per_request, raw):
    """JSON Python's parser refuses with other errors than JSONDecodeError (1 MiB body limit here)."""
    r = httpx.post(bento_tiny_per_request.url + "/chat", content=raw, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "not acceptable JSON" in r.json()["error"]["message"]
    assert "Traceback" not in bento_tiny_per_request.log


def test_wrong_method_and_path_are_4xx(bento_tiny):
    assert httpx.get(bento_tiny.url + "/chat", headers=bento_tiny.headers(), timeout=10).status_code == 405
    assert httpx.post(bento_tiny.url + "/v2/chat", headers=bento_tiny.headers(), timeout=10).status_code == 404


def test_an_oversized_chunked_body_is_refused(bento_tiny):
    def chunks():
        for _ in range(10):
            yield b"x" * 1024

    r = httpx.post(bento_tiny.url + "/chat", content=chunks(), headers=bento_tiny.headers(), timeout=30)
    assert r.status_code == 413


def test_service_still_serves_after_the_corpus(bento_tiny):
    for path, body, _status, _ in CORPUS:  # the whole corpus again, then a good request
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(bento_tiny.url + path, content=content, headers=bento_tiny.headers(), timeout=30)
    r = httpx.post(bento_tiny.url + "/chat", json={"prompt": "hello", "generate_kwargs": {"max_new_tokens": 4}},
                   headers=bento_tiny.headers(), timeout=30)
    assert r.status_code == 200 and r.json()["Result"].startswith("hello")
    assert httpx.get(bento_tiny.url + "/livez", timeout=10).status_code == 200
    assert "Traceback" not in bento_tiny.log
