"""Prompt prefix caching: the cache's bookkeeping, and the batching engine's answers with it on
(tiny model, fp32, in-process) against transformers' own generate."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from serving_bento.backend import ChatBackend
from serving_bento.config import ServiceConfig
from serving_bento.engine import BatchingEngine, SamplingParams
from serving_bento.prefix_cache import PrefixCache, common_prefix_length
from tests.serving_bento.test_engine import Collector, reference


@pytest.mark.parametrize(("a", "b", "limit", "expected"), [
    ((1, 2, 3, 4), [1, 2, 3, 4], 10, 4),
    ((1, 2, 3, 4), [1, 2, 3, 4], 3, 3),
    ((1, 2, 3, 4), [1, 2, 9, 4], 10, 2),
    ((1, 2), [1, 2, 3], 10, 2),
    ((5,), [1], 10, 0),
    ((), [1, 2], 10, 0),
    (tuple(range(1000)), list(range(777)) + [0] * 50, 2000, 777),
])
def test_common_prefix_length(a, b, limit, expected):
    assert common_prefix_length(a, b, limit) == expected


def test_lookup_finds_the_longest_prefix_of_the_same_adapter_but_never_the_last_token():
    cache = PrefixCache(max_tokens=100, min_tokens=3)
    system = list(range(10))
    assert cache.store(None, system + [50, 51], "A") and cache.store(None, system[:5] + [60, 61], "B")
    assert cache.store("alpha", system + [50, 51, 52], "C")
    assert cache.lookup(None, system + [50, 99]) == (11, "A")  # the longest: A shares 11 tokens, B 5
    assert cache.lookup(None, system[:5] + [60, 61, 62]) == (7, "B")
    assert cache.lookup(None, system + [50, 51]) == (11, "A")  # all of A but the prompt's last token
    assert cache.lookup("alpha", system + [50, 51, 52, 53]) == (13, "C")  # its own adapter's entry
    assert cache.lookup("beta", system + [50, 51]) == (0, None)  # no entry for this adapter
    assert cache.lookup(None, [0, 1, 99]) == (0, None)  # 2 shared tokens: under min_tokens
    assert cache.queried == 12 + 8 + 12 + 14 + 12 + 3 and cache.hits == 11 + 7 + 11 + 13


def test_store_keeps_the_budget_drops_covered_entries_and_refuses_what_adds_nothing():
    cache = PrefixCache(max_tokens=30, min_tokens=3)
    turn1 = list(range(10))
    turn2 = turn1 + list(range(100, 110))  # the same conversation one turn later
    assert cache.store(None, turn1, "t1")
    assert cache.store(None, turn2, "t2")
    assert len(cache) == 1 and cache.tokens == 20  # turn2 holds all of turn1
    assert not cache.store(None, turn1, "again") and not cache.wants(None, turn2[:15])  # already held
    assert cache.wants("alpha", turn1)  # another adapter's keys are other keys
    assert not cache.store(None, [1, 2, 3], "short") and not cache.store(None, list(range(31)), "long")
    other = [7] * 9 + [8]
    assert cache.store(None, other, "o") and cache.tokens == 30
    assert cache.lookup(None, turn2 + [1])[1] == "t2"  # t2 used last: o is the least recently used
    assert cache.store(None, [9] * 10, "n") and cache.tokens == 30 and len(cache) == 2  # o went: 40 > 30
    assert cache.lookup(None, other + [1]) == (0, None) and cache.lookup(None, turn2 + [1])[0] == 20
    off = PrefixCache(max_tokens=0)
    assert not off.store(None, turn1, "x") and len(off) == 0


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


SYSTEM = ("You are a careful assistant running on a Kubernetes cluster; answer in one short sentence and "
          "never invent facts. The user asks: ")


def test_prompts_sharing_a_prefix_answer_as_without_the_cache(tiny):
    """A first prompt fills the cache; then one batch mixes a repeat of it, two prompts that share
    its system prompt, one that extends it (the next turn) and one that shares nothing: every row
    gives generate's greedy answer, and the engine reports the cached tokens it reused."""
    model, tok = tiny
    first = tok(SYSTEM + "what is a pod?")["input_ids"]
    later = [first,
             tok(SYSTEM + "what is a node pool in AKS?")["input_ids"],
             tok(SYSTEM + "why?")["input_ids"],
             first + tok(" A pod is a group of containers. And a Deployment?")["input_ids"][1:],
             tok("0 1 2 3 4 5 6 7 8 9")["input_ids"]]
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=8, prefix_cache_tokens=1024)
    reported: list[tuple[int, int]] = []
    engine.prefix_observer = lambda queried, hits: reported.append((queried, hits))
    engine.start()
    try:
        c = Collector(1 + len(later))
        engine.submit(c.request(0, first, SamplingParams(max_new_tokens=12)))
        c.wait(1)
        with engine.hold():  # one admission for the five, whatever the timing
            for i, ids in enumerate(later, start=1):
                engine.submit(c.request(i, ids, SamplingParams(max_new_tokens=12)))
        c.wait(len(later))
    finally:
        engine.stop()
    for i, ids in enumerate([first, *later]):
        assert c.tokens[i] == reference(model, ids, 12)[: len(c.tokens[i])], i
        assert c.reasons[i] in ("stop", "length")
    shared = [common_prefix_length(first, ids, len(ids) - 1) for ids in later]
    assert shared[0] == len(first) - 1 and shared[3] == len(first) and shared[4] < 8
    assert min(shared[1], shared[2]) >= len(tok(SYSTEM)["input_ids"]) - 2
    assert reported[0] == (len(first), 0)
    assert reported[1] == (sum(len(ids) for ids in later), sum(n for n in shared if n >= 8))


def test_adapters_never_share_cached_prefixes(tiny_model_path, tiny_adapters):
    """Per-request adapters change the keys and values: the same prompt for another adapter is
    prefilled in full, and each request still gets its own adapter's answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving_bento.adapters import apply_adapters, load_separate_adapters
    from serving_bento.config import AdapterSpec

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    specs = {"alpha": AdapterSpec("alpha", str(tiny_adapters["alpha"]), 1.0),
             "beta": AdapterSpec("beta", str(tiny_adapters["beta"]), 1.0)}
    model, router = load_separate_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                           tuple(specs.values()))
    engine = BatchingEngine(model.eval(), tok, context_length=512, max_batch_size=8, router=router,
                            prefix_cache_tokens=1024)
    reported: list[tuple[int, int]] = []
    engine.prefix_observer = lambda queried, hits: reported.append((queried, hits))
    ids = tok(SYSTEM + "what is a pod?")["input_ids"]
    order = ["alpha", "beta", "alpha", None]
    engine.start()
    try:
        c = Collector(len(order))
        for i, adapter in enumerate(order):  # one at a time: each admission sees the cache the last one left
            request = c.request(i, ids, SamplingParams(max_new_tokens=10))
            request.adapter = adapter
            engine.submit(request)
            c.wait(1)
    finally:
        engine.stop()
    assert [hits for _, hits in reported] == [0, 0, len(ids) - 1, 0]
    for i, adapter in enumerate(order):
        alone = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
        if adapter:
            alone = apply_adapters(alone, (specs[adapter],))
        expected = alone.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert c.tokens[i] == expected[0, len(ids):].tolist()[: len(c.tokens[i])], (i, adapter)


def test_without_the_cache_nothing_is_kept_or_reported(tiny):
    model, tok = tiny
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=8)  # prefix_cache_tokens=0
    reported: list[tuple[int, int]] = []
    engine.prefix_observer = lambda queried, hits: reported.append((queried, hits))
    ids = tok(SYSTEM + "what is a pod?")["input_ids"]
    engine.start()
    try:
        c = Collector(2)
        for i in range(2):
            engine.submit(c.request(i, ids, SamplingParams(max_new_tokens=6)))
            c.wait(1)
    finally:
        engine.stop()
    assert c.tokens[0] == c.tokens[1] == reference(model, ids, 6)[: len(c.tokens[0])]
    assert reported == [] and engine._prefixes is None


def test_the_service_counts_prefix_cache_tokens_in_vllms_metrics():
    """KAIFLOW_PREFIX_CACHE_TOKENS reaches the engine, and the second of two identical prompts shows
    its reused tokens in vllm:prefix_cache_queries/hits (the backend as the service runs it)."""
    registry = CollectorRegistry()
    backend = ChatBackend(ServiceConfig(model="kaiflow-tiny-test", prefix_cache_tokens=256), metrics_registry=registry)
    backend.start_loading()
    try:
        assert backend.wait_ready(120)
        ids = backend.encode_prompt(SYSTEM + "what is a pod?")
        label = {"model_name": "kaiflow-tiny-test"}
        texts = []
        for _ in range(2):
            text, _ = asyncio.run(backend.complete(ids, SamplingParams(max_new_tokens=4)))
            texts.append(text)
    finally:
        backend.shutdown()
    assert texts[0] == texts[1]
    assert registry.get_sample_value("vllm:prefix_cache_queries_total", label) == 2 * len(ids)
    assert registry.get_sample_value("vllm:prefix_cache_hits_total", label) == len(ids) - 1
