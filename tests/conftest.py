"""Shared test set-up: offline Hugging Face, no BentoML telemetry, fixtures from tests/fixtures/."""

import os
from pathlib import Path

# Set before any test module imports datasets/huggingface_hub/bentoml.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every module in tests/fixtures/ is a pytest plugin: a fixture that starts a real service
# (registry, Kubernetes API emulator, ARM endpoint, Bento server) lives in one place there. The
# plain helpers the plugins import (no fixtures) are not: a plugin importing one before pytest
# registered it would leave it without assertion rewriting, and pytest warns.
HELPERS = {"__init__", "tcp"}
pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (Path(__file__).parent / "fixtures").glob("*.py") if p.stem not in HELPERS
)
