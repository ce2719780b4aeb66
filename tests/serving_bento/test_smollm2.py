"""End to end with a real small model: SmolLM2-135M-Instruct served by `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_kaito_chat_answers_correctly(bento_smollm2):
    r = httpx.post(bento_smollm2.url + "/chat", timeout=120, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "generate_kwargs": {"max_new_tokens": 16, "do_sample": False}})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["Result"]


def test_openai_client_streamed_and_not(bento_smollm2):
    import openai

    client = openai.OpenAI(base_url=bento_smollm2.url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "What is the capital of Sweden? Answer in one sentence."}]
    whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=16,
                                           temperature=0)
    assert "Stockholm" in whole.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, token by token
    assert "".join(pieces) == whole.choices[0].message.content
