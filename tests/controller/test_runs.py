"""Issue 17 items 2, 8, 9 as pure functions: which run of a generation exists (plan_run, run_record),
what marks make a pipeline object kaiflow's (owner_of), and the operator's server-side watch filters.
The cluster-box tests (tests/cluster/test_operator_ownership.py) show the same on a real API server."""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.structs.references import Resource

from api.labels import ANNOTATION_OWNER, ANNOTATION_RERUN, LABEL_MANAGED_BY, LABEL_WORKSPACE, MANAGED_BY, owner_annotation
from controller.decide import RunPlan, pipeline_name, plan_run, run_record
from controller.operator import owner_of, registry
from controller.options import ControllerOptions

T0 = 1_800_000_000.0


def ws(record=None, rerun=None, generation=1):
    body = {"metadata": {"name": "w", "namespace": "ns", "generation": generation,
                         "annotations": {ANNOTATION_RERUN: rerun} if rerun else {}}, "status": {}}
    if record is not None:
        body["status"]["pipeline"] = record
    return body


def test_a_recorded_generation_is_not_made_again():
    # Nothing recorded: the first run (a token already present is taken as honoured).
    assert plan_run(ws(rerun="t0"), 1, T0) == RunPlan(1, True, 1, "t0", "first")
    record = {"kind": "Workflow", "name": "w-tuning-1", "generation": 1, "run": 1, "attempt": 1, "rerunToken": "t0",
              "lastRun": {"name": "w-tuning-1", "phase": "Succeeded"}}
    # Recorded (the Workflow may be gone after Argo's TTL): nothing to create, however often asked.
    assert plan_run(ws(record, rerun="t0"), 1, T0 + 10**6).create is False
    # A new generation, or a new token, makes a new run.
    assert plan_run(ws(record, generation=2), 2, T0).create is True
    rerun = plan_run(ws(record, rerun="t1"), 1, T0)
    assert (rerun.run, rerun.create, rerun.rerun_token, rerun.why) == (2, True, "t1", "rerun")
    assert pipeline_name("w", "tuning", 1, run=2) == "w-tuning-1-r2" != pipeline_name("w", "tuning", 1)


def test_failures_are_retried_after_a_capped_back_off_and_exit_code_2_never():
    options = ControllerOptions(max_attempts=4, retry_backoff_s=60, retry_backoff_max_s=100)
    failed = {"name": "w-tuning-1", "phase": "Failed", "finishedAt": "2027-01-15T08:00:00Z"}
    first = run_record(RunPlan(1, True, 1, None, "first"), options, failed, "1", T0)
    assert first["nextRetryAt"] == "2027-01-15T08:01:00Z" and first["retry"].startswith("attempt 2 of 4 after 60 s")
    third = run_record(RunPlan(3, True, 3, None, "retry"), options, failed, "1", T0)
    assert third["nextRetryAt"] == "2027-01-15T08:01:40Z"  # 240 s capped at 100 s
    last = run_record(RunPlan(4, True, 4, None, "retry"), options, failed, "1", T0)
    assert "nextRetryAt" not in last and "4 of 4 attempts" in last["retry"]
    bad_input = run_record(RunPlan(1, True, 1, None, "first"), options, failed, "2", T0)
    assert "nextRetryAt" not in bad_input and "exit code 2" in bad_input["retry"]

    record = {"kind": "Workflow", "name": "w-tuning-1", "generation": 1, "run": 1, "attempt": 1,
              "lastRun": failed, **first}
    from controller.decide import _timestamp  # noqa: PLC0415 - the test reads the same clock format
    at = _timestamp(first["nextRetryAt"])
    assert plan_run(ws(record), 1, at - 1).create is False
    retry = plan_run(ws(record), 1, at)
    assert (retry.run, retry.attempt, retry.why, retry.create) == (2, 2, "retry", True)


def test_only_objects_with_every_kaiflow_mark_are_kaiflows():
    ours = {"metadata": {"labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_WORKSPACE: "w"},
                         "annotations": {ANNOTATION_OWNER: owner_annotation("ns", "w")},
                         "ownerReferences": [{"kind": "Workspace", "name": "w", "uid": "u1"}]}}
    assert owner_of(ours, "ns", "w") == "kaiflow"
    assert owner_of({"metadata": {"labels": {"team": "x"}}}, "ns", "w") == "foreign"
    other_owner = {"metadata": {**ours["metadata"], "ownerReferences": [{"kind": "ConfigMap", "name": "w", "uid": "u"}]}}
    assert owner_of(other_owner, "ns", "w") == "foreign"
    labels_only = {"metadata": {"labels": ours["metadata"]["labels"]}}
    assert owner_of(labels_only, "ns", "w") == "foreign"


def test_watches_filter_pods_deployments_and_workflows_on_the_server():
    reg, _ = registry(ControllerOptions())
    settings = kopf.OperatorSettings()
    for handler in reg._activities.get_all_handlers():
        if handler.id.endswith(".configure"):
            asyncio.run(_call(handler.fn, settings))
    pods = Resource("", "v1", "pods")
    deployments = Resource("apps", "v1", "deployments")
    workflows = Resource("argoproj.io", "v1alpha1", "workflows")
    for resource in (pods, deployments, workflows):
        selectors = list(settings.watching.label_selectors.collect(resource))
        assert f"{LABEL_MANAGED_BY}={MANAGED_BY}" in ",".join(selectors), resource
    assert f"{LABEL_WORKSPACE}" in ",".join(settings.watching.label_selectors.collect(pods))


async def _call(fn, settings):
    result = fn(settings=settings)
    if asyncio.iscoroutine(result):
        await result
