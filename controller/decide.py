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

import datetime
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api import WorkspaceValidationError, validate_workspace
from api.crd import immutable_changes, immutable_values
from api.defaults import target_node_count as estimate_node_count
from api.labels import (
    ANNOTATION_IMMUTABLE,
    ANNOTATION_OWNER,
    ANNOTATION_RERUN,
    DATASET_URLS_SECRET_KEY,
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
    # Applied before the pipeline object: the Secret holding signed dataset URLs, if any.
    secret: dict[str, Any] | None = None


@dataclass(frozen=True)
class Refused:
    reason: str  # api.workspace_status.REASON_INVALID or REASON_IMMUTABLE
    message: str
    fields: tuple[str, ...]


def pipeline_name(workspace: str, kind: str, generation: int, scheduled: bool = False, run: int = 1) -> str:
    """``<ws>-<kind>-<generation>``; a re-run or retry of the same generation adds ``-r<run>``."""
    if scheduled:
        return cron_workflow_name(workspace)
    return dns1123_label(f"{workspace}-{kind}-{generation}" + (f"-r{run}" if run > 1 else ""))


@dataclass(frozen=True)
class RunPlan:
    """Which run of a generation's Workflow should exist, and whether to create it now.

    A generation's pipeline runs once: the status records it (``status.pipeline.generation``,
    ``run``), and a Workflow that Argo's TTL deleted is never made again. A new run needs a new
    generation, a re-run request (``ANNOTATION_RERUN`` set to a token not yet honoured), or an
    automatic retry of a failed run once ``status.pipeline.nextRetryAt`` has passed.
    """

    run: int
    create: bool
    attempt: int  # automatic attempts since the generation began or the last re-run request
    rerun_token: str | None
    why: str  # "first" | "rerun" | "retry" | "recorded"


def plan_run(body: dict[str, Any], generation: int, now_s: float) -> RunPlan:
    """The run the status and annotations call for (pure: the operator applies it)."""
    record = ((body.get("status") or {}).get("pipeline")) or {}
    token = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_RERUN) or None
    if record.get("kind") != "Workflow" or record.get("generation") != generation:
        # Not yet recorded for this generation: its first run (a token already there is consumed).
        return RunPlan(run=1, create=True, attempt=1, rerun_token=token, why="first")
    run = int(record.get("run") or 1)
    attempt = int(record.get("attempt") or 1)
    recorded_token = record.get("rerunToken")
    if token and token != recorded_token:
        return RunPlan(run=run + 1, create=True, attempt=1, rerun_token=token, why="rerun")
    last = record.get("lastRun") or {}
    due = _timestamp(record.get("nextRetryAt"))
    if (last.get("name") == record.get("name") and last.get("phase") in ("Failed", "Error")
            and due is not None and now_s >= due):
        return RunPlan(run=run + 1, create=True, attempt=attempt + 1, rerun_token=recorded_token, why="retry")
    return RunPlan(run=run, create=False, attempt=attempt, rerun_token=recorded_token, why="recorded")


def retry_after(options: ControllerOptions, attempt: int) -> float | None:
    """Seconds before automatic attempt ``attempt + 1`` (doubling, capped), None once attempts are spent."""
    if attempt >= options.max_attempts:
        return None
    return min(options.retry_backoff_s * (2 ** (attempt - 1)), options.retry_backoff_max_s)


def run_record(plan: RunPlan, options: ControllerOptions, last_run: dict[str, Any] | None,
               failure_exit_code: str | None, now_s: float) -> dict[str, Any]:
    """The bookkeeping kept beside ``status.pipeline``'s name and lastRun for a Workflow."""
    record: dict[str, Any] = {"run": plan.run, "attempt": plan.attempt, "maxAttempts": options.max_attempts}
    if plan.rerun_token:
        record["rerunToken"] = plan.rerun_token
    phase = (last_run or {}).get("phase")
    if phase not in ("Failed", "Error"):
        return record
    hint = f"set the annotation {ANNOTATION_RERUN} to a new value to run it again"
    if failure_exit_code == "2":
        record["retry"] = f"not retried: exit code 2 (bad input; retrying will not help); {hint}"
        return record
    delay = retry_after(options, plan.attempt)
    if delay is None:
        record["retry"] = f"not retried: {plan.attempt} of {options.max_attempts} attempts made; {hint}"
        return record
    failed_at = _timestamp((last_run or {}).get("finishedAt")) or now_s
    record["nextRetryAt"] = _iso(failed_at + delay)
    record["retry"] = f"attempt {plan.attempt + 1} of {options.max_attempts} after {delay:.0f} s back-off"
    return record


def _timestamp(value: Any) -> float | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def target_node_count(workspace: Any) -> int:
    """GPU nodes the Workspace needs (Kaito's node estimator, ``api.defaults``)."""
    return estimate_node_count(workspace)


def target(options: ControllerOptions, namespace: str, name: str, preset: str | None = None,
           dataset_urls_secret: str | None = None) -> Any:
    """The ``pipelines.Target`` a Workflow is rendered for (the cluster unless told otherwise)."""
    if options.target == "local":
        workdir = Path(options.local_root or ".").resolve() / namespace / name
        return Target.local(workdir, base_dir=options.local_base_dir)
    return Target.cluster(provider=options.provider,
                          insecure_registries=tuple(options.insecure_registry) or None,
                          allow_http_datasets=options.allow_http_datasets,
                          dataset_block_cidrs=tuple(options.dataset_block_cidr),
                          dataset_allow_cidrs=tuple(options.dataset_allow_cidr),
                          allow_remote_code=remote_code_allowed(options, namespace, preset),
                          dataset_urls_secret=dataset_urls_secret)


def signed_urls(workspace: Any) -> list[str]:
    """The dataset URLs when one carries a query string or credentials (a signature, a SAS token)."""
    urls = (workspace.tuning.input.urls or []) if workspace.tuning and workspace.tuning.input else []
    signed = any(urllib.parse.urlsplit(u).query or urllib.parse.urlsplit(u).username for u in urls)
    return list(urls) if signed else []


def dataset_urls_secret(body: dict[str, Any], name: str, namespace: str, urls: list[str]) -> dict[str, Any]:
    """The Secret the fetch step reads signed URLs from (never the Workflow spec or pod arguments)."""
    meta = body.get("metadata") or {}
    owner = [{"apiVersion": body.get("apiVersion") or "kaito.sh/v1beta1", "kind": "Workspace", "name": name,
              "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}] if meta.get("uid") else None
    secret: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        # generateName: the operator only ever creates such Secrets (RBAC: create, no get), a new one
        # per run, garbage-collected with the Workspace.
        "metadata": {"generateName": f"{name}-dataset-urls-", "namespace": namespace,
                     "labels": {LABEL_WORKSPACE: name, LABEL_MANAGED_BY: MANAGED_BY},
                     "annotations": {ANNOTATION_OWNER: owner_annotation(namespace, name)}},
        "stringData": {DATASET_URLS_SECRET_KEY: "".join(f"{u}\n" for u in urls)},
    }
    if owner:
        secret["metadata"]["ownerReferences"] = owner
    return secret


def remote_code_allowed(options: ControllerOptions, namespace: str, preset: str | None) -> bool:
    """The admin's ``--allow-remote-code`` entries: ``NS``, ``NS/PRESET`` or ``*/PRESET``."""
    for entry in options.allow_remote_code:
        ns, _, model = entry.partition("/")
        if ns in ("*", namespace) and (not model or model == preset):
            return True
    return False


def _plain_http_urls(workspace: Any) -> list[tuple[int, str]]:
    urls = (workspace.tuning.input.urls or []) if workspace.tuning and workspace.tuning.input else []
    return [(i, u) for i, u in enumerate(urls) if urllib.parse.urlsplit(u).scheme.lower() == "http"]


def spec_of(body: dict[str, Any]) -> dict[str, Any]:
    """The Workspace as a user wrote it: no status, only the metadata kaiflow reads."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "labels", "annotations", "uid", "generation") if meta.get(k)}
    return {**{k: v for k, v in body.items() if k not in ("status", "metadata")}, "metadata": kept}


def decide(body: dict[str, Any], options: ControllerOptions, accepted: dict[str, Any] | None = None,
           run: int = 1) -> Desired | Refused:
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

    if options.target != "local" and not options.allow_http_datasets:
        plain = _plain_http_urls(workspace)
        if plain:
            return Refused(REASON_INVALID, "; ".join(
                f"tuning.input.urls[{i}]: plain http is refused in this cluster (use https; an admin may allow http "
                f"with the controller's --allow-http-datasets)" for i, _ in plain),
                tuple(f"tuning.input.urls[{i}]" for i, _ in plain))

    name, namespace = workspace.name, workspace.namespace
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    kind = "tuning" if workspace.is_tuning else "inference"
    scheduled = bool(workspace.tuning and workspace.tuning.schedule)
    object_name = pipeline_name(name, kind, generation, scheduled, run)
    try:
        preset = workspace.tuning.preset.name if workspace.tuning and workspace.tuning.preset else None
        signed = signed_urls(workspace) if options.target != "local" else []
        secret = dataset_urls_secret(body, name, namespace, signed) if signed else None
        rendered = manifest(workspace, target(options, namespace, object_name, preset,
                                              secret["metadata"]["generateName"] if secret else None))
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
                   is_tuning=workspace.is_tuning, secret=secret)


def _lifetime(rendered: dict[str, Any], options: ControllerOptions, scheduled: bool) -> None:
    """Apply the install's Workflow TTL and pod GC (Kaito #1107: finished runs free what they hold)."""
    spec = rendered["spec"]["workflowSpec"] if scheduled else rendered["spec"]
    if options.workflow_ttl_s is not None:
        spec["ttlStrategy"] = {"secondsAfterCompletion": options.workflow_ttl_s}
    if options.pod_gc is not None:
        # the rendered deleteDelayDuration stays: succeeded pods' logs are readable for a day
        spec["podGC"] = {**(spec.get("podGC") or {}), "strategy": options.pod_gc}
