"""A Workspace's status from what the cluster shows: a pure function, tested without a server.

Inputs are the objects as the API server returns them: the Argo Workflow run (its ``status.nodes``
carry each DAG task's phase, message, exit code and output parameters), the Deployment the
deploy task made and its pods. Output is the whole new ``status`` plus the condition transitions,
which the operator posts as Kubernetes Events (``kubectl describe wks`` tells the story).

The rules, with Kaito's types and reasons (``api.workspace_status``):

* ``ResourceReady`` follows the ``provision-nodes`` task; ``NodesReady`` (and ``NodeClaimReady`` for
  Karpenter) once the task reports its nodes, which also fill ``status.workerNodes``.
* Tuning: ``JobStarted`` once the ``tune`` task runs; ``WorkspaceSucceeded`` when the Workflow
  succeeds, or False with the failing task, its exit code and message when it fails.
* ``InferenceReady`` becomes True only after the ``smoke-test`` task passed, and stays True only
  while the Deployment's pods are ready: a crash-looping, OOM-killed, image-less or unschedulable
  pod turns it False with that reason (Kaito reported Ready over crash-looping pods, its #931).
* ``status.state``: tuning Pending → Running → Succeeded | Failed; inference Pending → Running →
  Ready, NotReady after a regression, Failed when the pipeline failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from api import workspace_status as ws
from pipelines.names import (
    OUTPUT_IMAGE,
    OUTPUT_NODES,
    OUTPUT_PROMOTE,
    OUTPUT_PROVIDER,
    OUTPUT_SERVICE_URL,
    TASK_DEPLOY,
    TASK_EVAL_GATE,
    TASK_PROVISION,
    TASK_PUSH_ADAPTER,
    TASK_SMOKE_TEST,
    TASK_TUNE,
)

FAILED_PHASES = ("Failed", "Error")
DONE_PHASES = ("Succeeded", "Failed", "Error")
KARPENTER = "karpenter"
# Pod states that keep a model server from ever becoming ready, by Kaito's reason.
WAITING_REASONS = {
    "CrashLoopBackOff": ws.REASON_CRASH_LOOP,
    "ImagePullBackOff": ws.REASON_IMAGE_PULL,
    "ErrImagePull": ws.REASON_IMAGE_PULL,
    "InvalidImageName": ws.REASON_IMAGE_PULL,
}
POD_REASONS = {*WAITING_REASONS.values(), ws.REASON_OOM_KILLED, ws.REASON_UNSCHEDULABLE, ws.REASON_PODS_NOT_READY}
ESTABLISHED_REASONS = {ws.REASON_SMOKE_TEST_PASSED, ws.REASON_PODS_READY, *POD_REASONS}


@dataclass(frozen=True)
class Transition:
    type: str
    status: str
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return self.status == "False" and self.reason in (
            ws.REASON_JOB_FAILED, ws.REASON_WORKSPACE_FAILED, ws.REASON_INVALID, ws.REASON_IMMUTABLE, ws.REASON_NAME_TAKEN,
            ws.REASON_PROVISION_FAILED, ws.REASON_PIPELINE_FAILED, ws.REASON_RELEASE_TIMEOUT, *POD_REASONS)


@dataclass
class Observed:
    status: dict[str, Any]
    transitions: list[Transition] = field(default_factory=list)


# ---------------------------------------------------------------------------- Argo Workflow reading


def task_node(run: dict[str, Any] | None, task: str) -> dict[str, Any] | None:
    """The node of a DAG task (for a retried task: its Retry node, which carries the overall phase)."""
    nodes = ((run or {}).get("status") or {}).get("nodes") or {}
    return next((n for n in nodes.values() if n.get("displayName") == task and n.get("type") != "DAG"), None)


def task_phase(run: dict[str, Any] | None, task: str) -> str | None:
    node = task_node(run, task)
    return node.get("phase") if node else None


def task_output(run: dict[str, Any] | None, task: str, name: str) -> str | None:
    node = task_node(run, task)
    for param in ((node or {}).get("outputs") or {}).get("parameters") or []:
        if param.get("name") == name:
            return param.get("value")
    return None


def _exit_code(run: dict[str, Any], node: dict[str, Any]) -> str | None:
    code = (node.get("outputs") or {}).get("exitCode")
    if code is not None:
        return str(code)
    nodes = (run.get("status") or {}).get("nodes") or {}
    attempts = [nodes[c] for c in node.get("children") or [] if c in nodes]
    for attempt in reversed(attempts):
        code = (attempt.get("outputs") or {}).get("exitCode")
        if code is not None:
            return str(code)
    return None


def _message(run: dict[str, Any], node: dict[str, Any]) -> str | None:
    """What went wrong in a task: for a retried one, its last attempt's message (the pod's own).

    Argo's Retry node says why it stopped retrying ("retryStrategy.expression evaluated to false",
    "No more retries left"); the attempt under it carries the container's termination message.
    """
    nodes = (run.get("status") or {}).get("nodes") or {}
    attempts = [nodes[c] for c in node.get("children") or [] if c in nodes]
    failed = [a for a in attempts if a.get("phase") in FAILED_PHASES and a.get("message")]
    if node.get("type") == "Retry" and failed:
        return max(failed, key=lambda a: a.get("finishedAt") or a.get("startedAt") or "")["message"]
    return node.get("message")


def _failed_node(run: dict[str, Any]) -> dict[str, Any] | None:
    nodes = (run.get("status") or {}).get("nodes") or {}
    failed = [n for n in nodes.values() if n.get("phase") in FAILED_PHASES and n.get("type") in ("Pod", "Retry")
              and "(" not in (n.get("displayName") or "(")]
    if not failed:
        failed = [n for n in nodes.values() if n.get("phase") in FAILED_PHASES and n.get("type") == "Pod"]
    return min(failed, key=lambda n: n.get("finishedAt") or n.get("startedAt") or "") if failed else None


def failure_exit_code(run: dict[str, Any] | None) -> str | None:
    """The exit code of the first failed task (``"2"``: bad input, not worth a retry)."""
    node = _failed_node(run) if run else None
    return _exit_code(run, node) if run and node else None


def failure(run: dict[str, Any] | None) -> str | None:
    """"task X failed (exit code N): message" for the first failed task, else the Workflow's message."""
    if not run:
        return None
    status = run.get("status") or {}
    node = _failed_node(run)
    if node:
        task = (node.get("displayName") or "?").split("(")[0]
        code = _exit_code(run, node)
        detail = f" (exit code {code})" if code else ""
        return f"task {task} failed{detail}: {_message(run, node) or status.get('message') or 'no message'}"
    return status.get("message")


def run_summary(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run:
        return None
    status = run.get("status") or {}
    summary: dict[str, Any] = {"name": run["metadata"]["name"], "phase": status.get("phase") or "Pending"}
    for key in ("startedAt", "finishedAt"):
        if status.get(key):
            summary[key] = status[key]
    if status.get("phase") in FAILED_PHASES:
        summary["message"] = failure(run)
    promote = task_output(run, TASK_EVAL_GATE, OUTPUT_PROMOTE)
    if promote is not None:
        summary["promoted"] = promote.strip().lower() == "true"
    image = task_output(run, TASK_PUSH_ADAPTER, OUTPUT_IMAGE)
    if image:
        summary["adapterImage"] = image
    return summary


# ---------------------------------------------------------------------------- pods


def pod_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(Kaito reason, message) for the first pod that cannot become ready, else None."""
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                return ws.REASON_UNSCHEDULABLE, f"pod {name}: {cond.get('message') or 'unschedulable'}"
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            state, last = container.get("state") or {}, container.get("lastState") or {}
            for terminated in (state.get("terminated"), last.get("terminated")):
                if terminated and terminated.get("reason") == "OOMKilled":
                    return ws.REASON_OOM_KILLED, f"pod {name}, container {container.get('name')}: OOMKilled"
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in WAITING_REASONS:
                message = waiting.get("message") or waiting["reason"]
                return WAITING_REASONS[waiting["reason"]], f"pod {name}, container {container.get('name')}: {message}"
    return None


def deployment_ready(deployment: dict[str, Any]) -> bool:
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    replicas = spec.get("replicas", 1)
    meta = deployment.get("metadata") or {}
    current = status.get("observedGeneration") is None or status.get("observedGeneration") == meta.get("generation")
    return current and (status.get("readyReplicas") or 0) >= replicas and (status.get("updatedReplicas", replicas) >= replicas)


# ---------------------------------------------------------------------------- the status


def refused(status: dict[str, Any] | None, reason: str, message: str, generation: int) -> Observed:
    """The status of a Workspace kaiflow will not run (invalid, or an immutable field changed)."""
    old = status or {}
    conditions = ws.set_condition(old.get("conditions"), ws.WORKSPACE_SUCCEEDED, False, reason, message,
                                  generation=generation)
    new = {**old, "conditions": conditions, "observedGeneration": generation}
    if reason == ws.REASON_INVALID:
        new["state"] = ws.STATE_FAILED
    return Observed(new, _transitions(old.get("conditions"), conditions))


def observe(status: dict[str, Any] | None, *, generation: int, is_tuning: bool, target_node_count: int,
            pipeline: dict[str, Any] | None, run: dict[str, Any] | None,
            deployment: dict[str, Any] | None = None, pods: list[dict[str, Any]] | None = None,
            nodes_released: bool | None = None) -> Observed:
    """The new status (see the module doc); ``run`` is the Workflow (or a CronWorkflow's latest run)."""
    old = status or {}
    conditions = [c for c in old.get("conditions") or []
                  if c.get("type") not in (ws.WORKSPACE_DELETING,)
                  and c.get("reason") not in (ws.REASON_INVALID, ws.REASON_IMMUTABLE, ws.REASON_NAME_TAKEN)]
    gen = {"generation": generation}
    phase = ((run or {}).get("status") or {}).get("phase") or "Pending"
    failed = phase in FAILED_PHASES
    why = failure(run) if failed else None

    # ResourceReady / NodesReady / NodeClaimReady from the provision task.
    provision = task_phase(run, TASK_PROVISION)
    provider = task_output(run, TASK_PROVISION, OUTPUT_PROVIDER)
    worker_nodes = _json_list(task_output(run, TASK_PROVISION, OUTPUT_NODES))
    if provision == "Succeeded":
        listed = ", ".join(worker_nodes) or "none reported"
        conditions = ws.set_condition(conditions, ws.RESOURCE_READY, True, ws.REASON_PROVISIONED, f"nodes: {listed}", **gen)
        conditions = ws.set_condition(conditions, ws.NODES_READY, True, ws.REASON_PROVISIONED,
                                      f"{len(worker_nodes)} node(s) ready ({provider or 'unknown'} provider): {listed}", **gen)
        if provider == KARPENTER:
            conditions = ws.set_condition(conditions, ws.NODECLAIM_READY, True, ws.REASON_PROVISIONED,
                                          "NodeClaims launched and registered", **gen)
    elif provision in FAILED_PHASES:
        message = failure(run) or f"{TASK_PROVISION} failed"
        conditions = ws.set_condition(conditions, ws.RESOURCE_READY, False, ws.REASON_PROVISION_FAILED, message, **gen)
    else:
        conditions = ws.set_condition(conditions, ws.RESOURCE_READY, False, ws.REASON_PROVISIONING,
                                      f"waiting for the {TASK_PROVISION} task", **gen)

    # Tuning: JobStarted.
    if is_tuning:
        tune = task_phase(run, TASK_TUNE)
        if tune in FAILED_PHASES or (failed and tune is None):
            conditions = ws.set_condition(conditions, ws.JOB_STARTED, False, ws.REASON_JOB_FAILED, why or "", **gen)
        elif tune is not None and tune != "Pending":
            conditions = ws.set_condition(conditions, ws.JOB_STARTED, True, ws.REASON_JOB_STARTED,
                                          f"the {TASK_TUNE} task started", **gen)
        else:
            conditions = ws.set_condition(conditions, ws.JOB_STARTED, False, ws.REASON_JOB_PENDING,
                                          f"waiting for the {TASK_TUNE} task", **gen)

    # InferenceReady: the smoke test first, then the pods.
    previous = ws.find_condition(old.get("conditions"), ws.INFERENCE_READY)
    smoke_passed = task_phase(run, TASK_SMOKE_TEST) == "Succeeded"
    established = smoke_passed or (previous is not None and previous.get("reason") in ESTABLISHED_REASONS)
    if established:
        problem = pod_problem(pods or [])
        if problem:
            conditions = ws.set_condition(conditions, ws.INFERENCE_READY, False, problem[0], problem[1], **gen)
        elif deployment is not None and not deployment_ready(deployment):
            ready = (deployment.get("status") or {}).get("readyReplicas") or 0
            want = (deployment.get("spec") or {}).get("replicas", 1)
            conditions = ws.set_condition(conditions, ws.INFERENCE_READY, False, ws.REASON_PODS_NOT_READY,
                                          f"{ready}/{want} pods of deployment {deployment['metadata']['name']} ready", **gen)
        elif deployment is not None:
            conditions = ws.set_condition(conditions, ws.INFERENCE_READY, True, ws.REASON_PODS_READY,
                                          f"smoke test passed; deployment {deployment['metadata']['name']} ready", **gen)
        else:
            url = task_output(run, TASK_DEPLOY, OUTPUT_SERVICE_URL)
            conditions = ws.set_condition(conditions, ws.INFERENCE_READY, True, ws.REASON_SMOKE_TEST_PASSED,
                                          f"smoke test passed{' at ' + url if url else ''}", **gen)
    elif failed and not is_tuning:
        conditions = ws.set_condition(conditions, ws.INFERENCE_READY, False, ws.REASON_PIPELINE_FAILED, why or "", **gen)
    elif not failed:
        conditions = ws.set_condition(conditions, ws.INFERENCE_READY, False, ws.REASON_DEPLOYING,
                                      f"waiting for the {TASK_DEPLOY} and {TASK_SMOKE_TEST} tasks", **gen)
    inference_ready = ws.condition_status(conditions, ws.INFERENCE_READY) == "True"

    # WorkspaceSucceeded and state.
    if failed:
        conditions = ws.set_condition(conditions, ws.WORKSPACE_SUCCEEDED, False, ws.REASON_WORKSPACE_FAILED, why or "", **gen)
        state = ws.STATE_FAILED
    elif is_tuning and phase == "Succeeded":
        conditions = ws.set_condition(conditions, ws.WORKSPACE_SUCCEEDED, True, ws.REASON_WORKSPACE_SUCCEEDED,
                                      "the tuning pipeline finished", **gen)
        state = ws.STATE_SUCCEEDED
    elif not is_tuning and inference_ready:
        conditions = ws.set_condition(conditions, ws.WORKSPACE_SUCCEEDED, True, ws.REASON_WORKSPACE_SUCCEEDED,
                                      "the model is served", **gen)
        state = ws.STATE_READY
    else:
        if not (not is_tuning and established):
            conditions = ws.set_condition(conditions, ws.WORKSPACE_SUCCEEDED, False, ws.REASON_WORKSPACE_PENDING,
                                          f"pipeline {phase.lower()}", **gen)
        if not is_tuning and established:
            state = ws.STATE_NOT_READY
        else:
            state = ws.STATE_RUNNING if phase == "Running" else ws.STATE_PENDING

    new = {k: v for k, v in old.items() if k not in ("conditions",)}
    new.update(conditions=conditions, state=state, targetNodeCount=target_node_count, observedGeneration=generation)
    if worker_nodes:
        new["workerNodes"] = worker_nodes
    if pipeline is not None:
        record: dict[str, Any] = {"kind": pipeline["kind"], "name": pipeline["metadata"]["name"], "generation": generation}
        if provider:
            record["provider"] = provider
        summary = run_summary(run)
        if summary:
            if nodes_released is not None:
                summary["nodesReleased"] = nodes_released
            record["lastRun"] = summary
        new["pipeline"] = record
    return Observed(new, _transitions(old.get("conditions"), conditions))


def _json_list(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def _transitions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[Transition]:
    out = []
    for cond in new:
        before = ws.find_condition(old, cond["type"])
        if before is None or (before.get("status"), before.get("reason")) != (cond["status"], cond.get("reason")):
            out.append(Transition(cond["type"], cond["status"], cond.get("reason") or "", cond.get("message") or ""))
    return out
