"""Shared test set-up: offline Hugging Face, no BentoML telemetry, fixtures from tests/fixtures/."""

import os
from pathlib import Path

import pytest

# Set before any test module imports datasets/huggingface_hub/bentoml.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In a worker of `pytest -n 3` (make test) the other workers keep the cores busy: torch (and the
# tune/serve processes a test starts, which inherit this) take one thread each, as on a shared node;
# with two OpenMP threads per process on two shared cores, each waits on a descheduled sibling
# (docs/reference/benchmarks.md, "torch threads").
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every module in tests/fixtures/ is a pytest plugin: a fixture that starts a real service
# (registry, Kubernetes API emulator, ARM endpoint, Bento server) lives in one place there. The
# plain helpers the plugins import (no fixtures) are not: a plugin importing one before pytest
# registered it would leave it without assertion rewriting, and pytest warns.
HELPERS = {"__init__", "tcp"}
pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem not in HELPERS
)


# How `make test` (`pytest -n 3 --dist loadscope --no-loadscope-reorder`) shares the tests out
# between its workers: every test of tests/cluster/ in one worker (one cluster box per run: it
# takes 15-25 s to start and holds ~2 GB), every other test file whole in one worker (its module and
# session fixtures, a Bento server or a trained adapter, made once). xdist's own `loadgroup` would
# do it with marks, but with pytest 9.2 it no longer can (xdist 3.8 renames `item._nodeid`, which
# pytest 9.2 does not read): the files were scattered and each worker started a box of its own.
BOX_TESTS = "tests/cluster/"

# The units that take longest, first (measured: the box's tests about 40 % of the suite's time, then
# tuning, the controller on the emulator, serving): handed out in this order, the long ones start at
# once and the many short files fill in behind them, instead of one worker ending alone on a long
# one. xdist's own reordering (by number of tests) would start with the many fast parametrized ones.
FIRST = (BOX_TESTS, "tests/steps/tune/", "tests/controller/", "tests/serving_bento/",
         "tests/steps/deploy/", "tests/local_runner/", "tests/kaiflow/")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadscope":
        return None  # xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class BoxAndFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return BOX_TESTS if path.startswith(BOX_TESTS) else path

    return BoxAndFiles(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In an xdist worker, the tests in ``FIRST``'s order, then the rest as collected (the same order
    in every worker: xdist compares them); each file's tests keep their order. Without xdist the
    order stays as collected."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        def rank(item: pytest.Item) -> int:
            return next((i for i, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))

        items.sort(key=rank)
