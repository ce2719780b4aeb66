"""The batching engine against transformers' own generate, on the tiny model, in-process."""

from __future__ import annotations

import threading
import time

import pytest

from serving_bento.engine import BatchingEngine, GenerationRequest, NaiveEngine, SamplingParams, sample_next_tokens


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval(), AutoTokenizer.from_pretrained(tiny_model_path)


PROMPTS = ["The capital of France", "Kubernetes runs containers on a cluster of nodes and", "Hi", "0 1 2 3 4 5 6 7"]


class Collector:
    def __init__(self, n: int):
        self.tokens = {i: [] for i in range(n)}
        self.reasons: dict[int, str] = {}
        self.done = threading.Semaphore(0)

    def request(self, i: int, ids: list[int], params: SamplingParams) -> GenerationRequest:
        def finish(reason: str) -> None:
            self.reasons[i] = reason
            self.done.release()

        return GenerationRequest(ids, params, self.tokens[i].append, finish)

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout), "a request never finished"


def reference(model, ids: list[int], n: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("engine_cls", [BatchingEngine, NaiveEngine])
def test_greedy_output_equals_generate_with_staggered_arrivals(tiny, engine_cls):
    model, tok = tiny
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    lengths = [12, 5, 20, 9]  # rows leave the batch at different steps
    engine = engine_cls(model, tok, context_length=512, max_batch_size=8)
    engine.start()
    try:
        c = Collector(len(ids))
        for i, prompt_ids in enumerate(ids):
            engine.submit(c.request(i, prompt_ids, SamplingParams(max_new_tokens=lengths[i])))
            time.sleep(0.02)  # later prompts join a batch that is already decoding
        c.wait(len(ids))
    finally:
        engine.stop()
    for i, prompt_ids in enumerate(ids):
        expected = reference(model, prompt_ids, lengths[i])
        assert c.tokens[i] == expected[: len(c.tokens[i])]
        if c.reasons[i] == "length":
            assert len(c.tokens[i]) == lengths[i]
        else:
            assert c.reasons[i] == "stop" and c.tokens[i][-1] in engine.stop_token_ids


def test_batch_size_limit_queues_the_rest_and_all_finish(tiny):
    model, tok = tiny
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=2)
    engine.start()
    try:
        c = Collector(6)
        for i in range(6):
            engine.submit(c.request(i, tok(PROMPTS[i % 4])["input_ids"], SamplingParams(max_new_tokens=6)))
        c.wait(6)
    finally:
        engine.stop()
    assert all(1 <= len(t) <= 6 for t in c.tokens.values())


def test_seeded_sampling_is_reproducible_and_cancel_frees_the_slot(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[0])["input_ids"]
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=1)
    engine.start()
    try:
        c = Collector(3)
        engine.submit(c.request(0, ids, params))
        engine.submit(c.request(1, ids, params))
        c.wait(2)
        assert c.tokens[0] == c.tokens[1]
        long = c.request(2, ids, SamplingParams(max_new_tokens=400))
        on_token = long.on_token

        def cancel_after_five(token: int) -> None:  # the client leaves mid-generation, at a known token
            on_token(token)
            if len(c.tokens[2]) == 5:
                long.cancel()

        long.on_token = cancel_after_five
        engine.submit(long)
        c.wait(1)
        assert c.reasons[2] in ("cancelled", "stop")
        assert len(c.tokens[2]) <= 5  # dropped at the step after the cancel (or stopped before)
    finally:
        engine.stop()


def test_context_limit_ends_generation(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    engine = BatchingEngine(model, tok, context_length=len(ids) + 3, max_batch_size=4)
    engine.start()
    try:
        c = Collector(1)
        engine.submit(c.request(0, ids, SamplingParams(max_new_tokens=100)))
        c.wait(1)
    finally:
        engine.stop()
    assert len(c.tokens[0]) <= 3


def test_sampling_respects_top_k_and_greedy_rows():
    import torch

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(do_sample=True, top_k=2, seed=0), SamplingParams(do_sample=False)]
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed), None]
        picked = sample_next_tokens(logits, params, gens).tolist()
        assert picked[0] in (1, 3) and picked[1] == 0


def test_backend_is_ready_only_once_model_and_adapters_are_loaded(tiny_adapters):
    """What /readyz reports (the service's __is_ready__): false while loading, true after."""
    from prometheus_client import CollectorRegistry

    from serving_bento.backend import ChatBackend
    from serving_bento.config import AdapterSpec, ServiceConfig

    config = ServiceConfig(model="kaiflow-tiny-test", adapters=(AdapterSpec("alpha", str(tiny_adapters["alpha"])),))
    backend = ChatBackend(config, metrics_registry=CollectorRegistry())
    assert not backend.ready and backend.alive
    backend.start_loading()
    assert not backend.ready  # loading takes at least the model and adapter reads
    try:
        assert backend.wait_ready(120)
        assert backend.ready and backend.alive and backend.loaded.adapters == config.adapters
    finally:
        backend.shutdown()
    assert not backend.ready and not backend.alive  # the engine stopped: liveness fails
    import asyncio

    from serving_bento.schemas import RequestError

    with pytest.raises(RequestError) as info:  # a request that slips in now gets a 503 to retry, not a 500
        asyncio.run(backend.complete([1, 2, 3], SamplingParams(max_new_tokens=2)))
    assert info.value.status == 503


def test_backend_with_a_broken_adapter_is_not_alive(tmp_path):
    from prometheus_client import CollectorRegistry

    from serving_bento.backend import ChatBackend
    from serving_bento.config import AdapterSpec, ServiceConfig

    backend = ChatBackend(ServiceConfig(model="kaiflow-tiny-test", adapters=(AdapterSpec("x", str(tmp_path)),)),
                          metrics_registry=CollectorRegistry())
    backend.start_loading()
    deadline = time.monotonic() + 60
    while backend.load_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.ready and not backend.alive and "no adapter_config.json" in backend.load_error


def test_one_bad_request_ends_alone_and_every_request_finishes(tiny):
    """A seed torch refuses (2**64: the HTTP schema bounds it, the engine must not trust that) and a
    request whose token callback raises each end with "error"/"cancelled"; the rows decoded beside
    them give exactly what they give alone."""
    model, tok = tiny
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=8)
    engine.start()
    try:
        c = Collector(5)
        good = [c.request(i, ids[i], SamplingParams(max_new_tokens=8)) for i in range(3)]
        bad_seed = c.request(3, ids[0], SamplingParams(max_new_tokens=8, do_sample=True, seed=2**64))

        def explode(token: int) -> None:
            raise RuntimeError("the client's loop is gone")

        finish_4 = c.request(4, [], SamplingParams()).on_finish
        bad_callback = GenerationRequest(ids[1], SamplingParams(max_new_tokens=8), explode, finish_4)
        for request in (good[0], bad_seed, good[1], bad_callback, good[2]):
            engine.submit(request)
        c.wait(5)
        assert engine.running
    finally:
        engine.stop()
    assert c.reasons[3] == "error" and c.tokens[3] == []
    assert c.reasons[4] == "cancelled"
    for i in range(3):
        assert c.tokens[i] == reference(model, ids[i], 8)[: len(c.tokens[i])] and c.reasons[i] in ("stop", "length")


def test_a_failed_prefill_ends_only_the_new_requests(tiny):
    """Admission fails for a prompt with a token id outside the vocabulary; the batch already decoding goes on."""
    model, tok = tiny
    ids = tok(PROMPTS[0])["input_ids"]
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=8)
    engine.start()
    try:
        c = Collector(2)
        engine.submit(c.request(0, ids, SamplingParams(max_new_tokens=40)))
        time.sleep(0.05)  # the first request is decoding when the bad one arrives
        engine.submit(c.request(1, [10**6], SamplingParams(max_new_tokens=4)))
        c.wait(2)
    finally:
        engine.stop()
    assert c.reasons[1] == "error"
    assert c.tokens[0] == reference(model, ids, 40)[: len(c.tokens[0])] and c.reasons[0] in ("stop", "length")


def test_stopping_the_engine_finishes_queued_and_running_requests(tiny):
    model, tok = tiny
    ids = tok(PROMPTS[0])["input_ids"]
    engine = BatchingEngine(model, tok, context_length=512, max_batch_size=1)
    engine.start()
    c = Collector(3)
    for i in range(3):
        engine.submit(c.request(i, ids, SamplingParams(max_new_tokens=400)))
    time.sleep(0.05)
    engine.stop()
    c.wait(3, timeout=20)
    assert set(c.reasons.values()) <= {"cancelled", "stop", "length"}


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny_model_path, tiny_adapters):
    """Per-request adapters: rows for the base, alpha and beta (at 0.5) in one batch each give what
    that adapter alone (merged, as Kaito would serve it) gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving_bento.adapters import apply_adapters, load_separate_adapters
    from serving_bento.config import AdapterSpec

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    specs = {"alpha": AdapterSpec("alpha", str(tiny_adapters["alpha"]), 1.0),
             "beta": AdapterSpec("beta", str(tiny_adapters["beta"]), 0.5)}
    model, router = load_separate_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                           tuple(specs.values()))
    engine = BatchingEngine(model.eval(), tok, context_length=512, max_batch_size=8, router=router)
    rows_per_step: list[int] = []
    engine.step_observer = rows_per_step.append  # what kaiflow_batch_rows records
    ids = tok(PROMPTS[0])["input_ids"]
    choices = [None, "alpha", "beta", "alpha", None, "beta"]
    engine.start()
    try:
        c = Collector(len(choices))
        with engine.hold():  # all six queued before the engine admits any: one batch, whatever the timing
            for i, adapter in enumerate(choices):
                request = c.request(i, ids, SamplingParams(max_new_tokens=10))
                request.adapter = adapter
                engine.submit(request)
        c.wait(len(choices))
        with pytest.raises(ValueError, match="adapter 'gamma' is not loaded"):
            engine.submit(GenerationRequest(ids, SamplingParams(), print, print, adapter="gamma"))
    finally:
        engine.stop()
    expected = {}
    for name in (None, "alpha", "beta"):
        alone = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
        if name:
            alone = apply_adapters(alone, (specs[name],))
        out = alone.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected[name] = out[0, len(ids):].tolist()
    assert len({tuple(v) for v in expected.values()}) == 3
    assert rows_per_step[0] == len(choices), rows_per_step  # the first decode step had every request
    for i, adapter in enumerate(choices):
        assert c.tokens[i] == expected[adapter][: len(c.tokens[i])], (i, adapter)


def test_naive_engine_seeds_each_request_alone(tiny):
    """Issue 17 (Low): a seeded request must not make the next unseeded one predictable. The naive
    engine used to seed torch's global generator; each request now samples from its own state."""
    import torch

    model, tok = tiny
    ids = tok(PROMPTS[1])["input_ids"]
    seeded = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, seed=7)
    unseeded = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50)
    engine = NaiveEngine(model, tok, context_length=512, max_batch_size=1)
    engine.start()
    try:
        runs = []
        for _ in range(2):
            c = Collector(2)
            before = torch.random.get_rng_state()
            engine.submit(c.request(0, ids, seeded))
            c.wait(1)
            assert torch.equal(torch.random.get_rng_state(), before), "the seeded request changed the global generator"
            engine.submit(c.request(1, ids, unseeded))
            c.wait(1)
            runs.append((c.tokens[0], c.tokens[1]))
    finally:
        engine.stop()
    assert runs[0][0] == runs[1][0]  # a seed still reproduces its own request
    assert runs[0][1] != runs[1][1]  # what follows it is not predictable from that seed
