"""Bounded load: 8 concurrent clients, a fixed number of requests each, zero errors allowed.

Also checks that the service records its decode steps (the ``kaiflow_batch_rows`` histogram). How
many rows shared a step depends on how the OS schedules the clients, so that is not asserted here:
``test_engine.py`` puts known requests in one batch with ``engine.hold()`` and checks the rows the
engine records per step.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

CLIENTS = 8
REQUESTS_PER_CLIENT = 4


def _batch_rows(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = float(re.search(r"^kaiflow_batch_rows_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^kaiflow_batch_rows_count (\S+)", text, re.M).group(1))
    return total, count


def run_load(server, model: str, max_tokens: int, requests_per_client: int = REQUESTS_PER_CLIENT) -> list[str]:
    """Each client alternates /chat and a streamed /v1/chat/completions; returns the errors."""
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as http:
            start.wait()
            for i in range(requests_per_client):  # bounded: a fixed number of requests
                try:
                    if i % 2 == 0:
                        r = http.post("/chat", json={"messages": [{"role": "user", "content": f"Question {n}.{i}"}],
                                                     "generate_kwargs": {"max_new_tokens": max_tokens, "top_k": 20}})
                        ok = r.status_code == 200 and isinstance(r.json().get("Result"), str)
                        problem = f"/chat {r.status_code} {r.text[:200]}"
                    else:
                        body = {"model": model, "messages": [{"role": "user", "content": f"Say {n} {i}"}],
                                "max_tokens": max_tokens, "stream": True, "temperature": 0.7}
                        with http.stream("POST", "/v1/chat/completions", json=body) as s:
                            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
                        ok = s.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                        ok = ok and all("choices" in json.loads(line[6:]) for line in lines[:-1])
                        problem = f"stream {s.status_code} {lines[-1:] if lines else 'no events'}"
                except httpx.HTTPError as exc:
                    ok, problem = False, f"{type(exc).__name__}: {exc}"
                if not ok:
                    with lock:
                        errors.append(f"client {n} request {i}: {problem}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return errors


def test_eight_clients_tiny_model_zero_errors_and_batched(bento_tiny):
    before = _batch_rows(bento_tiny)
    assert run_load(bento_tiny, bento_tiny.served_model, max_tokens=24) == []
    after = _batch_rows(bento_tiny)
    rows, steps = after[0] - before[0], after[1] - before[1]
    assert steps > 0 and rows >= steps, (rows, steps)  # every step decoded at least one row


@pytest.mark.slow
def test_eight_clients_smollm2_zero_errors(bento_smollm2):
    before = _batch_rows(bento_smollm2)
    assert run_load(bento_smollm2, bento_smollm2.served_model, max_tokens=16) == []
    after = _batch_rows(bento_smollm2)
    assert after[1] > before[1] and after[0] - before[0] >= after[1] - before[1]
