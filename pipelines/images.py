"""Image references, configurable per install.

The steps run in the pipeline image and the chat service in the serving image, the
``pipeline`` and ``serving`` stages of the repository's ``Dockerfile`` (``make images``; the
controller has its own slim stage). None is built on the development machines (no container
engine there): a machine with Docker builds and pushes them (``make images push REGISTRY=...
TAG=...``), and an install points kaiflow at its own copies with the ``images:`` of
``controller/manifests/kustomization.yaml``, which reach the controller as these environment
variables, read once when a pipeline is built:

``KAIFLOW_PIPELINE_IMAGE``  image of every step container
``KAIFLOW_SERVING_IMAGE``   image ``deploy --mode cluster`` runs the chat service in
``KAIFLOW_IMAGE_PULL_POLICY``  ``IfNotPresent`` unless set
``KAIFLOW_PIPELINE_UID``    uid (and gid) the pipeline image runs as, 1000 unless set

The step pods run as that uid with ``fsGroup`` set to it: a fresh volume is root-owned, and a
non-root step could not write the dataset or checkpoints to it otherwise.

The defaults are fixed strings so that rendered YAML (and the golden files) never depend on the
machine that rendered them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_REGISTRY = "ghcr.io/kaiflow"
DEFAULT_TAG = "0.1.0"
# The `USER` of the repository Dockerfile (tests/test_dockerfile.py keeps the two equal).
PIPELINE_UID = 1000


@dataclass(frozen=True)
class Images:
    pipeline: str = field(
        default=f"{DEFAULT_REGISTRY}/kaiflow-pipeline:{DEFAULT_TAG}",
        metadata={"help": "image every step container runs in (built from the repository Dockerfile)"},
    )
    serving: str = field(
        default=f"{DEFAULT_REGISTRY}/kaiflow-chat:{DEFAULT_TAG}",
        metadata={"help": "image of the BentoML chat service (the Dockerfile's serving stage)"},
    )
    pull_policy: str = field(default="IfNotPresent", metadata={"help": "imagePullPolicy of step containers"})
    pipeline_uid: int = field(
        default=PIPELINE_UID, metadata={"help": "uid and gid the pipeline image runs as (runAsUser, fsGroup)"}
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Images:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            pipeline=env.get("KAIFLOW_PIPELINE_IMAGE") or defaults.pipeline,
            serving=env.get("KAIFLOW_SERVING_IMAGE") or defaults.serving,
            pull_policy=env.get("KAIFLOW_IMAGE_PULL_POLICY") or defaults.pull_policy,
            pipeline_uid=int(env.get("KAIFLOW_PIPELINE_UID") or defaults.pipeline_uid),
        )
