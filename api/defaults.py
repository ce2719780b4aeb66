"""What kaiflow fills in where a Workspace leaves a field out (Kaito keeps defaults apart too).

Types are in ``api.workspace_types``, rules in ``api.workspace_validation``; this module answers
"what will actually run" for a valid Workspace, so the CLI, the pipelines and the controller
agree:

* ``instance_type``: the one written, none for bring-your-own nodes, else the SKU in
  ``presets/gpus.yaml`` with the fewest GPUs that hold the model, then the cheapest
  (``presets.gpus.pick_instance``);
* ``node_sku``: the node the pods are sized for (an unchecked or bring-your-own node is assumed to
  have one GPU and ``UNKNOWN_NODE_VCPUS``/``UNKNOWN_NODE_MEMORY_GIB``, so pods still schedule);
* ``target_node_count``: ``resource.count``, raised to what Kaito's node estimator asks for
  (``status.targetNodeCount``);
* ``tune_deadline_s`` / ``data_volume_gib``: grow with the model; a generic HF model, whose size is
  unknown until its files are downloaded, gets the largest.

Bring-your-own nodes: Kaito switches node auto-provisioning off for the whole cluster (a feature
gate); kaiflow decides per Workspace, with the annotation ``ANNOTATION_OWN_NODES: "true"``. Such a
Workspace names no instanceType; its pods go to the nodes ``labelSelector`` matches.
"""

from __future__ import annotations

import math
from typing import Any

from api.labels import ANNOTATION_API_KEY_SECRET, ANNOTATION_OWN_NODES
from presets import get_preset
from presets.gpus import Sku, lookup_sku, pick_instance
from presets.sizing import kaito_nodes_needed

DEFAULT_METHOD = "lora"
DEFAULT_COUNT = 1

UNKNOWN_NODE_GPUS = 1
UNKNOWN_NODE_VCPUS = 8
UNKNOWN_NODE_MEMORY_GIB = 56

MIN_TUNE_DEADLINE_H = 6
MAX_TUNE_DEADLINE_H = 48
MIN_DATA_VOLUME_GIB = 20
GENERIC_DATA_VOLUME_GIB = 500


def uses_own_nodes(workspace: Any) -> bool:
    annotations = workspace.metadata.annotations or {}
    return str(annotations.get(ANNOTATION_OWN_NODES, "")).lower() == "true"


def api_key_secret(workspace: Any) -> str | None:
    """The Secret named by ``ANNOTATION_API_KEY_SECRET``, if the Workspace asks for an API key."""
    annotations = workspace.metadata.annotations or {}
    return annotations.get(ANNOTATION_API_KEY_SECRET) or None


def tuning_method(workspace: Any) -> str | None:
    """The tuning method (lowercased; ``DEFAULT_METHOD`` when left out), None for inference."""
    if workspace.tuning is None:
        return None
    return (workspace.tuning.method or DEFAULT_METHOD).lower()


def preset(workspace: Any) -> Any:
    return get_preset(workspace.preset_name)


def instance_type(workspace: Any) -> str | None:
    """The SKU to provision: written, picked (smallest that fits), or None on your own nodes.

    Raises ValueError when it must be picked and cannot be: the model is generic (size unknown
    offline) or no SKU in the table holds it on one node.
    """
    if uses_own_nodes(workspace):
        return None
    written = workspace.resource.instance_type if workspace.resource else None
    if written:
        return written

    model = preset(workspace)
    if not model.sized:
        raise ValueError(f"{model.name} is a generic HuggingFace model: its size is unknown offline, so "
                         "resource.instanceType must be given")
    return pick_instance(model, tuning_method(workspace)).name


def node_sku(workspace: Any) -> Any:
    """The Sku the pods are sized for (see the module docstring for unknown nodes)."""

    name = instance_type(workspace)
    sku = lookup_sku(name) if name else None
    if sku is not None:
        return sku
    return Sku(name=name or "bring-your-own", gpu="unknown", gpus=UNKNOWN_NODE_GPUS, gpu_memory_gib=0,
               vcpus=UNKNOWN_NODE_VCPUS, memory_gib=UNKNOWN_NODE_MEMORY_GIB)


def nodes_needed(workspace: Any) -> int | None:
    """Kaito's node estimate for an inference Workspace; None when it cannot be computed here."""

    if workspace.inference is None or workspace.preset_name is None:
        return None
    model = preset(workspace)
    name = None if uses_own_nodes(workspace) else instance_type(workspace)
    sku = lookup_sku(name) if name else None
    if sku is None or not model.sized:
        return None
    try:
        return kaito_nodes_needed(model, sku.gpu_memory_gib, sku.gpus)
    except ValueError:
        return None


def target_node_count(workspace: Any) -> int:
    """``status.targetNodeCount``: resource.count, or more when Kaito's estimator needs more."""
    count = workspace.resource.count if workspace.resource else DEFAULT_COUNT
    try:
        needed = nodes_needed(workspace)
    except ValueError:
        needed = None
    return max(count, needed or 0)


def tune_deadline_s(model: Any) -> int:
    """Hours grow with the model: 6 h for the small presets, up to 48 h (and 48 h when unknown)."""
    if not model.sized:
        return MAX_TUNE_DEADLINE_H * 3600
    return int(min(MAX_TUNE_DEADLINE_H, max(MIN_TUNE_DEADLINE_H, model.params_b * 2)) * 3600)


def data_volume_gib(model: Any) -> int:
    """Weights (bf16) + checkpoints + dataset, with headroom."""
    if not model.sized:
        return GENERIC_DATA_VOLUME_GIB
    return int(max(MIN_DATA_VOLUME_GIB, math.ceil(model.params_b * 2 * 1.5) + 20))
