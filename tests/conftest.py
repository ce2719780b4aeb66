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
# In a worker of `pytest -n 2` (make test) the other worker keeps the second core busy: torch (and
# the tune/serve processes a test starts, which inherit this) take one thread each, as on a shared
# node; with two OpenMP threads per process on two shared cores, each waits on a descheduled sibling
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """How `pytest -n N --dist loadgroup` (make test) shares the tests out: the cluster box's tests
    all in one worker (one box per run: it takes 15-25 s to start and holds ~2 GB), every other test
    file whole in one worker (its module and session fixtures, a Bento server or a trained adapter,
    made once). Without xdist the mark does nothing."""
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        group = "cluster-box" if path.startswith("tests/cluster/") else path
        item.add_marker(pytest.mark.xdist_group(group))
