"""What a Workspace's ``status`` says, in Kaito's words: condition types, reasons and states.

Kaito users read a Workspace with ``kubectl get wks`` and ``kubectl wait --for=condition=...``;
the names here are Kaito's (``pkg/workspace/controllers``), so their scripts keep working. The
controller decides *when* each condition changes (``controller.status``); this module holds the
vocabulary, the status sub-models that the CRD schema is generated from, and the one rule for
updating a condition list (``set_condition``: the transition time moves only when the status
does, as ``meta.SetStatusCondition`` does in Go).
"""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Condition types (Kaito's).
RESOURCE_READY = "ResourceReady"
NODECLAIM_READY = "NodeClaimReady"
NODES_READY = "NodesReady"
INFERENCE_READY = "InferenceReady"
JOB_STARTED = "JobStarted"
WORKSPACE_SUCCEEDED = "WorkspaceSucceeded"
WORKSPACE_DELETING = "WorkspaceDeleting"
CONDITION_TYPES = (RESOURCE_READY, NODECLAIM_READY, NODES_READY, INFERENCE_READY, JOB_STARTED,
                   WORKSPACE_SUCCEEDED, WORKSPACE_DELETING)

# status.state (Kaito's high-level state).
STATE_PENDING = "Pending"
STATE_RUNNING = "Running"
STATE_READY = "Ready"
STATE_NOT_READY = "NotReady"
STATE_SUCCEEDED = "Succeeded"
STATE_FAILED = "Failed"
STATES = (STATE_PENDING, STATE_RUNNING, STATE_READY, STATE_NOT_READY, STATE_SUCCEEDED, STATE_FAILED)

# Reasons. Kaito's where Kaito has one (tuning job and workspace reasons, pod failure reasons).
REASON_JOB_PENDING = "Pending"
REASON_JOB_STARTED = "Started"
REASON_JOB_FAILED = "Failed"
REASON_WORKSPACE_PENDING = "workspacePending"
REASON_WORKSPACE_SUCCEEDED = "workspaceSucceeded"
REASON_WORKSPACE_FAILED = "workspaceFailed"
REASON_IMAGE_PULL = "ImagePullError"
REASON_CRASH_LOOP = "ContainerCrashLoopBackOff"
REASON_OOM_KILLED = "ContainerOOMKilled"
REASON_UNSCHEDULABLE = "Unschedulable"
# kaiflow's own, for what Kaito refuses at admission (its webhook) or does not have.
REASON_INVALID = "InvalidWorkspace"
REASON_IMMUTABLE = "ImmutableFieldChanged"
REASON_PROVISIONING = "Provisioning"
REASON_PROVISIONED = "Provisioned"
REASON_PROVISION_FAILED = "ProvisionFailed"
REASON_DEPLOYING = "Deploying"
REASON_SMOKE_TEST_PASSED = "SmokeTestPassed"
REASON_PODS_READY = "PodsReady"
REASON_PODS_NOT_READY = "PodsNotReady"
REASON_PIPELINE_FAILED = "PipelineFailed"
REASON_DELETING = "Deleting"
REASON_RELEASE_TIMEOUT = "ReleaseDeadlineExceeded"
# The pipeline's Workflow/CronWorkflow name is held by an object kaiflow did not make for this Workspace.
REASON_NAME_TAKEN = "PipelineNameTaken"


class StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class PerformanceMetric(StatusModel):
    """One benchmark figure (Kaito's ``status.performance.metrics`` entries)."""

    config: dict[str, str] | None = Field(default=None, description="benchmark parameters")
    description: str = Field(description="benchmark type and load pattern")
    unit: str | None = None
    value: str = Field(description="the measured value, as a string")


class Performance(StatusModel):
    metrics: dict[str, PerformanceMetric] | None = Field(default=None, description="metric name to metric")


class PipelineRun(StatusModel):
    """One Argo Workflow run of the Workspace (for a schedule: the most recent run)."""

    name: str
    phase: str | None = Field(default=None, description="Argo phase: Pending, Running, Succeeded, Failed, Error")
    started_at: str | None = None
    finished_at: str | None = None
    message: str | None = Field(default=None, description="the failing task, its exit code and message")
    promoted: bool | None = Field(default=None, description="scheduled runs: the eval gate's decision")
    adapter_image: str | None = Field(default=None, description="the adapter reference the run pushed")
    nodes_released: bool | None = Field(default=None, description="its provisioned nodes were freed after it failed")


class PipelineStatus(StatusModel):
    """kaiflow's record of the Argo object that runs the Workspace."""

    kind: str = Field(description="Workflow or CronWorkflow")
    name: str
    generation: int | None = Field(default=None, description="the Workspace generation it was made for")
    provider: str | None = Field(default=None, description="the provision provider that made the nodes")
    last_run: PipelineRun | None = None
    run: int | None = Field(default=None, description="Workflows: which run of this generation (1 = its first; "
                                                      "a re-run request or a retry adds one)")
    attempt: int | None = Field(default=None, description="automatic attempts since the generation or the last re-run request")
    max_attempts: int | None = Field(default=None, description="the controller's --max-attempts")
    rerun_token: str | None = Field(default=None, description="the last honoured kaiflow.kaito.sh/rerun annotation value")
    next_retry_at: str | None = Field(default=None, description="when the failed run is retried")
    retry: str | None = Field(default=None, description="the retry decision for a failed run")


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def set_condition(conditions: list[dict[str, Any]] | None, type_: str, status: bool | str, reason: str,
                  message: str = "", *, generation: int | None = None, at: str | None = None) -> list[dict[str, Any]]:
    """A new list with ``type_`` set; ``lastTransitionTime`` changes only when ``status`` does."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = find_condition(conditions, type_)
    changed = old is None or old.get("status") != value
    condition = {
        "type": type_, "status": value, "reason": reason, "message": message,
        "lastTransitionTime": (at or now()) if changed else old.get("lastTransitionTime") or at or now(),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    out = [c for c in conditions or [] if c.get("type") != type_]
    out.append(condition)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.get("type", ""), len(order)))


def condition_status(conditions: list[dict[str, Any]] | None, type_: str) -> str | None:
    found = find_condition(conditions, type_)
    return found.get("status") if found else None
