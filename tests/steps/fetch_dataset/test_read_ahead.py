"""``readers.read_ahead``: the Arrow batches are produced on a worker thread; what the caller sees
must be what the plain iterator gives, errors included, and an early stop must end the worker."""

from __future__ import annotations

import threading

import pytest

from stepkit.common import StepError
from steps.fetch_dataset.readers import read_ahead


def test_items_arrive_in_order():
    assert list(read_ahead(iter(range(1000)))) == list(range(1000))
    assert list(read_ahead(iter([]))) == []


def test_an_error_arrives_after_the_items_before_it():
    def batches():
        yield from range(5)
        raise StepError("url 'x' row 5: over the per-row cap")

    seen = []
    with pytest.raises(StepError, match="row 5: over the per-row cap"):
        for item in read_ahead(batches(), depth=1):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_stopping_early_ends_the_worker_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    before = {t.ident for t in threading.enumerate()}
    ahead = read_ahead(endless(), depth=2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "fetch-dataset-reader"]


def test_an_error_in_the_caller_ends_the_worker():
    def batches():
        yield from range(100)

    with pytest.raises(ValueError):
        ahead = read_ahead(batches(), depth=1)
        try:
            for item in ahead:
                if item == 3:
                    raise ValueError("the caller's own error")
        finally:
            ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "fetch-dataset-reader" and t.is_alive()]
