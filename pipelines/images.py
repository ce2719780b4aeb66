"""Image references, configurable per install.

The steps run in one pipeline image (kaiflow and its dependencies, built from the repository's
``Dockerfile``); the chat service runs in the image ``bentoml build``/``bentoml containerize``
makes from ``serving_bento/``. Neither is built on the development machines (no container engine
there): CI with Docker builds and pushes them, and an install points kaiflow at its own copies
with environment variables, read once when a pipeline is built:

``KAIFLOW_PIPELINE_IMAGE``  image of every step container
``KAIFLOW_SERVING_IMAGE``   image ``deploy --mode cluster`` runs the chat service in
``KAIFLOW_IMAGE_PULL_POLICY``  ``IfNotPresent`` unless set

The defaults are fixed strings so that rendered YAML (and the golden files) never depend on the
machine that rendered them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_REGISTRY = "ghcr.io/kaiflow"
DEFAULT_TAG = "0.1.0"


@dataclass(frozen=True)
class Images:
    pipeline: str = field(
        default=f"{DEFAULT_REGISTRY}/kaiflow-pipeline:{DEFAULT_TAG}",
        metadata={"help": "image every step container runs in (built from the repository Dockerfile)"},
    )
    serving: str = field(
        default=f"{DEFAULT_REGISTRY}/kaiflow-chat:{DEFAULT_TAG}",
        metadata={"help": "image of the BentoML chat service (bentoml containerize serving_bento)"},
    )
    pull_policy: str = field(default="IfNotPresent", metadata={"help": "imagePullPolicy of step containers"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Images:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            pipeline=env.get("KAIFLOW_PIPELINE_IMAGE") or defaults.pipeline,
            serving=env.get("KAIFLOW_SERVING_IMAGE") or defaults.serving,
            pull_policy=env.get("KAIFLOW_IMAGE_PULL_POLICY") or defaults.pull_policy,
        )
