"""OCI media types, descriptors and manifests, serialised once so their bytes define the digest."""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepkit.oci.client import RegistryClient

__all__ = ["ADAPTER_ANNOTATION_PREFIX", "ANNOTATION_CREATED", "ANNOTATION_TITLE", "CHUNK_BYTES", "DOCKER_MANIFEST", "DOCKER_MANIFEST_LIST",
           "EMPTY_CONFIG_BYTES", "EVAL_LOSS_ANNOTATION", "MANIFEST_ACCEPT", "OCI_EMPTY_CONFIG", "OCI_INDEX", "OCI_MANIFEST",
           "build_manifest", "empty_config_descriptor", "file_descriptor", "upload_empty_config"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
OCI_EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_BYTES = b"{}"

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"

# kaiflow's annotations on an adapter image's manifest: push_adapter writes them, eval_gate reads them.
ADAPTER_ANNOTATION_PREFIX = "sh.kaito.kaiflow."
EVAL_LOSS_ANNOTATION = ADAPTER_ANNOTATION_PREFIX + "eval-loss"

CHUNK_BYTES = 1 << 20


def file_descriptor(path: Path, media_type: str, title: str | None = None) -> dict:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    descriptor = {"mediaType": media_type, "digest": "sha256:" + hasher.hexdigest(), "size": size}
    if title is not None:
        descriptor["annotations"] = {ANNOTATION_TITLE: title}
    return descriptor


def empty_config_descriptor() -> dict:
    return {"mediaType": OCI_EMPTY_CONFIG, "digest": "sha256:" + hashlib.sha256(EMPTY_CONFIG_BYTES).hexdigest(),
            "size": len(EMPTY_CONFIG_BYTES), "data": base64.b64encode(EMPTY_CONFIG_BYTES).decode()}


def build_manifest(layers: Sequence[dict], artifact_type: str, annotations: dict[str, str],
                   config: dict | None = None) -> bytes:
    """An OCI 1.1 image manifest with ``artifactType``, serialised once (its bytes define the digest)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config or empty_config_descriptor(),
        "layers": list(layers),
        "annotations": dict(sorted(annotations.items())),
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def upload_empty_config(client: RegistryClient) -> dict:
    """Upload the OCI empty config blob ``{}`` (registries refuse a manifest whose config blob is
    missing) and return its descriptor."""
    descriptor = empty_config_descriptor()
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        handle.write(EMPTY_CONFIG_BYTES)
        handle.flush()
        client.upload_file(handle.name, descriptor, name="config")
    return descriptor
