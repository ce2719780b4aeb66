"""Status from Workflow, Deployment and pods: Kaito's conditions, reasons and states (pure).

The Workflows are built from the task and output names ``pipelines.dags`` renders
(``pipelines.names``), so renaming a task cannot leave the status reading the old name.
"""

from api.workspace_status import condition_status, find_condition
from controller.status import observe, refused
from pipelines.names import (
    OUTPUT_IMAGE,
    OUTPUT_NODES,
    OUTPUT_PROMOTE,
    OUTPUT_PROVIDER,
    TASK_DEPLOY,
    TASK_EVAL_GATE,
    TASK_FETCH_DATASET,
    TASK_PROVISION,
    TASK_PUSH_ADAPTER,
    TASK_PUSH_CANDIDATE,
    TASK_SMOKE_TEST,
    TASK_TUNE,
)


def workflow(phase, tasks, message=""):
    nodes = {"wf": {"displayName": "wf", "type": "DAG", "phase": phase}}
    for name, node in tasks.items():
        nodes[f"wf-{name}"] = {"displayName": name, "type": "Pod", **node}
    return {"kind": "Workflow", "metadata": {"name": "wf"}, "status": {"phase": phase, "nodes": nodes, "message": message}}


def ok(outputs=None):
    return {"phase": "Succeeded", "outputs": {"parameters": [{"name": k, "value": v} for k, v in (outputs or {}).items()]}}


def test_tuning_from_pending_to_succeeded():
    pending = observe(None, generation=1, is_tuning=True, target_node_count=1, pipeline=None, run=None)
    assert pending.status["state"] == "Pending"
    assert condition_status(pending.status["conditions"], "JobStarted") == "False"
    assert find_condition(pending.status["conditions"], "WorkspaceSucceeded")["reason"] == "workspacePending"

    running = workflow("Running", {TASK_PROVISION: ok({OUTPUT_NODES: '["n1","n2"]', OUTPUT_PROVIDER: "karpenter"}),
                                   TASK_FETCH_DATASET: ok(), TASK_TUNE: {"phase": "Running"}})
    step = observe(pending.status, generation=1, is_tuning=True, target_node_count=2, pipeline=running, run=running)
    conds = step.status["conditions"]
    assert step.status["state"] == "Running" and step.status["workerNodes"] == ["n1", "n2"]
    assert [condition_status(conds, t) for t in ("ResourceReady", "NodesReady", "NodeClaimReady", "JobStarted")] == ["True"] * 4
    assert {t.type for t in step.transitions} >= {"ResourceReady", "JobStarted"}

    done = workflow("Succeeded", {TASK_PROVISION: ok({OUTPUT_NODES: '["n1"]', OUTPUT_PROVIDER: "aks"}), TASK_TUNE: ok(),
                                  TASK_PUSH_ADAPTER: ok({OUTPUT_IMAGE: "r/a:1"}), TASK_SMOKE_TEST: ok()})
    final = observe(step.status, generation=1, is_tuning=True, target_node_count=2, pipeline=done, run=done)
    assert final.status["state"] == "Succeeded" and final.status["targetNodeCount"] == 2
    assert condition_status(final.status["conditions"], "WorkspaceSucceeded") == "True"
    assert final.status["pipeline"]["lastRun"]["adapterImage"] == "r/a:1"
    # Unchanged conditions keep their transition time and make no new event.
    again = observe(final.status, generation=1, is_tuning=True, target_node_count=2, pipeline=done, run=done)
    assert again.transitions == [] and again.status == final.status


def test_a_failed_task_reaches_the_condition_with_exit_code_and_message():
    failed = workflow("Failed", {TASK_PROVISION: ok(), TASK_FETCH_DATASET: {
        "phase": "Failed", "message": "error: tuning.input.urls[0]: 404 Not Found", "outputs": {"exitCode": "2"}}},
        message="child 'wf-fetch-dataset' failed")
    result = observe(None, generation=1, is_tuning=True, target_node_count=1, pipeline=failed, run=failed)
    cond = find_condition(result.status["conditions"], "WorkspaceSucceeded")
    assert cond["status"] == "False" and cond["reason"] == "workspaceFailed"
    assert cond["message"] == "task fetch-dataset failed (exit code 2): error: tuning.input.urls[0]: 404 Not Found"
    assert find_condition(result.status["conditions"], "JobStarted")["reason"] == "Failed"
    assert result.status["state"] == "Failed"
    assert any(t.warning for t in result.transitions)


def pod(**status):
    return {"metadata": {"name": "ws-abc"}, "status": status}


def deployment(ready):
    return {"metadata": {"name": "ws", "generation": 1}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "readyReplicas": ready, "updatedReplicas": 1}}


def test_inference_ready_only_after_smoke_test_and_only_while_pods_are_ready():
    deploying = workflow("Running", {TASK_PROVISION: ok(), TASK_DEPLOY: {"phase": "Running"}})
    before = observe(None, generation=1, is_tuning=False, target_node_count=1, pipeline=deploying, run=deploying,
                     deployment=deployment(1))
    assert condition_status(before.status["conditions"], "InferenceReady") == "False"

    done = workflow("Succeeded", {TASK_PROVISION: ok(), TASK_DEPLOY: ok(), TASK_SMOKE_TEST: ok()})
    ready = observe(before.status, generation=1, is_tuning=False, target_node_count=1, pipeline=done, run=done,
                    deployment=deployment(1))
    assert condition_status(ready.status["conditions"], "InferenceReady") == "True"
    assert ready.status["state"] == "Ready"

    crash = pod(containerStatuses=[{"name": "chat", "state": {"waiting": {"reason": "CrashLoopBackOff",
                                                                          "message": "back-off 5m0s"}}}])
    oom = pod(containerStatuses=[{"name": "chat", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                  "lastState": {"terminated": {"reason": "OOMKilled"}}}])
    pull = pod(containerStatuses=[{"name": "chat", "state": {"waiting": {"reason": "ImagePullBackOff"}}}])
    unschedulable = pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/3 nodes are available"}])
    for pods, reason in (([crash], "ContainerCrashLoopBackOff"), ([oom], "ContainerOOMKilled"),
                         ([pull], "ImagePullError"), ([unschedulable], "Unschedulable")):
        bad = observe(ready.status, generation=1, is_tuning=False, target_node_count=1, pipeline=done, run=done,
                      deployment=deployment(0), pods=pods)
        cond = find_condition(bad.status["conditions"], "InferenceReady")
        assert (cond["status"], cond["reason"]) == ("False", reason)
        assert bad.status["state"] == "NotReady"
    recovered = observe(bad.status, generation=1, is_tuning=False, target_node_count=1, pipeline=done, run=done,
                        deployment=deployment(1))
    assert condition_status(recovered.status["conditions"], "InferenceReady") == "True"


def test_scheduled_run_shows_the_eval_gate_decision():
    run = workflow("Succeeded", {TASK_EVAL_GATE: ok({OUTPUT_PROMOTE: "false"}), TASK_PUSH_CANDIDATE: ok({OUTPUT_IMAGE: "r/a:20261130"})})
    cron = {"kind": "CronWorkflow", "metadata": {"name": "ws-tuning"}}
    result = observe(None, generation=1, is_tuning=True, target_node_count=1, pipeline=cron, run=run)
    assert result.status["pipeline"]["kind"] == "CronWorkflow"
    assert result.status["pipeline"]["lastRun"] == {"name": "wf", "phase": "Succeeded", "promoted": False}


def test_refused_names_the_reason():
    result = refused(None, "InvalidWorkspace", "tuning.method: bad", 4)
    cond = find_condition(result.status["conditions"], "WorkspaceSucceeded")
    assert (cond["status"], cond["reason"], cond["message"]) == ("False", "InvalidWorkspace", "tuning.method: bad")
    assert result.status["state"] == "Failed" and result.status["observedGeneration"] == 4
