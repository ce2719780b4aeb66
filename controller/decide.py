"""What must exist for a Workspace at its generation: a pure function of the object and the options.

``decide(body, options, accepted)`` answers with either a ``Desired`` Argo object (a Workflow, or a
CronWorkflow for ``tuning.schedule``) rendered by ``pipelines.manifest`` for the configured target,
or a ``Refused`` verdict naming the fields at fault. The handlers in ``controller.operator`` only
compare that answer with the cluster and apply it; nothing here talks to the API server, so every
decision is tested without one.

Names are deterministic: ``<workspace>-<kind>-<generation>`` for Workflows (trimmed with a hash to
Argo's 63 characters), ``<workspace>-tuning`` for the CronWorkflow (one schedule per Workspace,
applied in place when the spec changes). A restart, a replayed event or a second replica therefore
finds the object it would create and adopts it instead of making another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import WorkspaceValidationError, validate_workspace
from api.crd import immutable_changes, immutable_values
from api.defaults import target_node_count as estimate_node_count
from api.labels import (
    ANNOTATION_IMMUTABLE,
    ANNOTATION_OWNER,
    LABEL_GENERATION,
    LABEL_MANAGED_BY,
    LABEL_WORKSPACE,
    MANAGED_BY,
    owner_annotation,
)
from api.workspace_status import REASON_IMMUTABLE, REASON_INVALID
from controller.options import ControllerOptions
from pipelines import PipelineError, Target, manifest
from pipelines.names import cron_workflow_name, dns1123_label

ARGO_API_VERSION = "argoproj.io/v1alpha1"


@dataclass(frozen=True)
class Desired:
    kind: str  # "Workflow" or "CronWorkflow"
    name: str
    namespace: str
    generation: int
    manifest: dict[str, Any]
    target_node_count: int
    is_tuning: bool


@dataclass(frozen=True)
class Refused:
    reason: str  # api.workspace_status.REASON_INVALID or REASON_IMMUTABLE
    message: str
    fields: tuple[str, ...]


def pipeline_name(workspace: str, kind: str, generation: int, scheduled: bool = False) -> str:
    if scheduled:
        return cron_workflow_name(workspace)
    return dns1123_label(f"{workspace}-{kind}-{generation}")


def target_node_count(workspace: Any) -> int:
    """GPU nodes the Workspace needs (Kaito's node estimator, ``api.defaults``)."""
    return estimate_node_count(workspace)


def target(options: ControllerOptions, namespace: str, name: str) -> Any:
    """The ``pipelines.Target`` a Workflow is rendered for (the cluster unless told otherwise)."""
    if options.target == "local":
        workdir = Path(options.local_root or ".").resolve() / namespace / name
        return Target.local(workdir, base_dir=options.local_base_dir)
    return Target.cluster(provider=options.provider,
                          insecure_registries=tuple(options.insecure_registry) or None)


def spec_of(body: dict[str, Any]) -> dict[str, Any]:
    """The Workspace as a user wrote it: no status, only the metadata kaiflow reads."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "labels", "annotations", "uid", "generation") if meta.get(k)}
    return {**{k: v for k, v in body.items() if k not in ("status", "metadata")}, "metadata": kept}


def decide(body: dict[str, Any], options: ControllerOptions, accepted: dict[str, Any] | None = None) -> Desired | Refused:
    """The pipeline object for this Workspace generation, or why there is none.

    ``accepted`` holds the immutable fields of the pipeline made for an earlier generation (from
    its ``ANNOTATION_IMMUTABLE``); a change of any of them is refused, as Kaito's webhook does.
    """
    spec = spec_of(body)
    try:
        # Kaito's cluster rules (https-only public dataset URLs, imagePushSecret, ...); a controller
        # rendering for the local runner (tests, one machine) takes the local ones (file: URLs, 127.0.0.1)
        workspace = validate_workspace(spec, mode="local" if options.target == "local" else "cluster")
    except WorkspaceValidationError as exc:
        return Refused(REASON_INVALID, "; ".join(str(e) for e in exc.errors), tuple(e.path for e in exc.errors))
    nodes = target_node_count(workspace)
    if nodes > options.max_nodes_per_workspace:
        # Provisioned before any pod exists, so no namespace ResourceQuota sees these nodes.
        return Refused(REASON_INVALID, f"resource.count: {nodes} nodes exceed this install's cap of "
                       f"{options.max_nodes_per_workspace} per Workspace (the operator's --max-nodes-per-workspace, "
                       "KAIFLOW_CONTROLLER_MAX_NODES_PER_WORKSPACE)", ("resource.count",))
    if accepted:
        changed = immutable_changes(accepted, spec)
        if changed:
            return Refused(REASON_IMMUTABLE, "; ".join(
                f"{path} is immutable (was {json.dumps(accepted[path])}); delete and recreate the Workspace to change it"
                for path in changed), tuple(changed))

    name, namespace = workspace.name, workspace.namespace
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    kind = "tuning" if workspace.is_tuning else "inference"
    scheduled = bool(workspace.tuning and workspace.tuning.schedule)
    object_name = pipeline_name(name, kind, generation, scheduled)
    try:
        rendered = manifest(workspace, target(options, namespace, object_name))
    except PipelineError as exc:
        return Refused(REASON_INVALID, str(exc), ())
    meta = rendered["metadata"]
    meta.pop("generateName", None)
    meta["name"] = object_name
    meta["namespace"] = namespace
    meta["labels"] = {**meta.get("labels", {}), LABEL_WORKSPACE: name, LABEL_MANAGED_BY: MANAGED_BY,
                      LABEL_GENERATION: str(generation)}
    meta["annotations"] = {**meta.get("annotations", {}), ANNOTATION_OWNER: owner_annotation(namespace, name),
                           ANNOTATION_IMMUTABLE: json.dumps(immutable_values(spec), sort_keys=True)}
    _lifetime(rendered, options, scheduled)
    return Desired(kind="CronWorkflow" if scheduled else "Workflow", name=object_name, namespace=namespace,
                   generation=generation, manifest=rendered, target_node_count=target_node_count(workspace),
                   is_tuning=workspace.is_tuning)


def _lifetime(rendered: dict[str, Any], options: ControllerOptions, scheduled: bool) -> None:
    """Apply the install's Workflow TTL and pod GC (Kaito #1107: finished runs free what they hold)."""
    spec = rendered["spec"]["workflowSpec"] if scheduled else rendered["spec"]
    if options.workflow_ttl_s is not None:
        spec["ttlStrategy"] = {"secondsAfterCompletion": options.workflow_ttl_s}
    if options.pod_gc is not None:
        spec["podGC"] = {"strategy": options.pod_gc}
