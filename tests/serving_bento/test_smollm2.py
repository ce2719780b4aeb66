"""End to end with a real small model: SmolLM2-135M-Instruct served by `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import re

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


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory):
    from presets.materialize import resolve_model
    from tests.fixtures.bento import make_lora_adapter

    path = resolve_model("smollm2-135m-instruct")
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return path, {name: make_lora_adapter(path, root / name, seed, r=8, scale=0.1)
                  for name, seed in (("tone", 11), ("style", 12))}


def test_adapters_per_request_on_real_text(smollm2_adapters):
    """SmolLM2 with two adapters served per request: naming an adapter changes the answer, and the
    base and both adapters decoded in one batch each give exactly what they give alone."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving_bento.adapters import load_separate_adapters
    from serving_bento.config import AdapterSpec
    from serving_bento.engine import BatchingEngine, GenerationRequest, SamplingParams

    path, adapters = smollm2_adapters
    tok = AutoTokenizer.from_pretrained(path)
    specs = tuple(AdapterSpec(name, str(folder), 1.0) for name, folder in adapters.items())
    model, router = load_separate_adapters(AutoModelForCausalLM.from_pretrained(path), specs)
    engine = BatchingEngine(model.eval(), tok, context_length=2048, max_batch_size=8, router=router)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write one sentence about the sea."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    def run(choices):
        tokens = {i: [] for i in range(len(choices))}
        done = threading.Semaphore(0)
        for i, adapter in enumerate(choices):
            engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=20), tokens[i].append,
                                            lambda reason: done.release(), adapter=adapter))
        for _ in choices:
            assert done.acquire(timeout=300)
        return [tok.decode(tokens[i], skip_special_tokens=True) for i in range(len(choices))]

    # One thread: the same sums in the same order on every run, however busy the machine (this
    # check once saw "The ocean is ..." instead of "The sea is ..." for one adapter on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine.start()
    try:
        alone = {adapter: run([adapter])[0] for adapter in (None, "tone", "style")}
        together = run([None, "tone", "style"])
    finally:
        engine.stop()
        torch.set_num_threads(threads)
    # each adapter changes the answer, and it stays on topic (B ~ N(0, 0.1): "The sea is a mysterious ...")
    assert len(set(alone.values())) == 3, alone
    assert all(re.search(r"\b(sea|ocean)s?\b", text.lower()) for text in alone.values()), alone
    assert together == [alone[None], alone["tone"], alone["style"]]
