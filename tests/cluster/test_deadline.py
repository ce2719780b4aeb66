"""``activeDeadlineSeconds`` enforced by Argo's own workflow-controller on a Workflow the operator
made, on the box's real API server (issue 16, "Argo's own controller runs our Workflows").

kaiflow gives every Workflow ``spec.activeDeadlineSeconds`` of three days
(``pipelines.dags.WORKFLOW_DEADLINE_S``) and each template its own (``pipelines.tasks.DEADLINES``,
the tune step's from the model's size); neither a Workspace field nor an operator option sets
them. So, as a test-only action, the test patches the running Workflow's
``spec.activeDeadlineSeconds`` down to 1 s with ``kubectl patch`` (the way an admin cuts a run short)
while the node agent holds the tune pod Running. Argo fails the step ("Step exceeded its deadline")
and the Workflow; the Workspace's condition names the task and Argo's reason, and the operator
frees the run's NodeClaims at once (Kaito #1107; ported from tests/controller/test_operator.py).

The Workspace's name has 63 characters, the most a Kubernetes name allows: the Workflow, the pods
Argo makes from it (their names and labels), the NodeClaims the operator requests and the
Workspace's deletion all work with it.
"""

from __future__ import annotations

import json
import threading

import pytest

from tests.cluster.conftest import phi3_gpu_node, workspace_file
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

NAME = "deadline-" + "x" * 54  # 63 characters
LABEL_WORKSPACE = "kaito.sh/workspace"


@pytest.fixture(scope="module")
def gpu_node(cluster_box):
    yield from phi3_gpu_node(cluster_box, "deadline-gpu-node")


def conditions(box, namespace: str) -> dict[str, dict]:
    ws = box.get("workspace.kaito.sh", NAME, namespace) or {}
    return {c["type"]: c for c in (ws.get("status") or {}).get("conditions") or []}


def node_claims(box) -> list[dict]:
    return box.list("nodeclaims.karpenter.sh", selector=f"{LABEL_WORKSPACE}={NAME}")


def test_argo_fails_a_run_past_its_deadline_and_the_condition_names_it(installed, tenant, start_controller,
                                                                       argo_agent, gpu_node):
    box = installed
    assert len(NAME) == 63
    kubeconfig = box.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    operator = start_controller(None, "--resync-s", "5", "--provider", "karpenter", "--namespace", tenant,
                                "--max-attempts", "1", kubeconfig=kubeconfig)
    hold, provisioned = threading.Event(), threading.Event()
    # provision-nodes ends once the operator's NodeClaims exist, as the real task (--wait-only) does:
    # the operator requests them at each refresh while the task waits, and no more once it is done.
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"}),
                      hold=provisioned)
    argo_agent.script(tenant, "tune", Outcome(), hold=hold)
    box.apply(workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant, name=NAME))
    try:
        [run] = wait_until(lambda: box.list("workflows.argoproj.io", namespace=tenant), timeout=60,
                           what="the operator's Workflow", detail=operator.log)
        workflow = run["metadata"]["name"]
        claims = wait_until(lambda: node_claims(box), timeout=60, what="the operator's NodeClaims", detail=operator.log)
        provisioned.set()

        def tune_running():
            return [p for p in box.list("pods", namespace=tenant, selector=f"workflows.argoproj.io/workflow={workflow}")
                    if p["metadata"]["annotations"].get("workflows.argoproj.io/node-name", "").split("(")[0].endswith(".tune")
                    and p["status"].get("phase") == "Running"]

        wait_until(tune_running, timeout=180, what="the tune pod Running", detail=operator.log)
        # Names at the limit: the API server refused nothing the operator or Argo made for this name.
        assert len(workflow) <= 63
        pods = box.list("pods", namespace=tenant, selector=f"workflows.argoproj.io/workflow={workflow}")
        tasks = {p["metadata"]["annotations"]["workflows.argoproj.io/node-name"].rsplit(".", 1)[-1].split("(")[0]
                 for p in pods}  # a retried task's pod is "<task>(<attempt>)"
        assert tasks >= {"provision-nodes", "fetch-dataset", "tune"}, tasks
        # (pod names may be 253 characters; the label Argo puts the Workflow's name in may not exceed 63)
        assert all(p["metadata"]["labels"]["workflows.argoproj.io/workflow"] == workflow for p in pods)
        assert all(c["metadata"]["labels"][LABEL_WORKSPACE] == NAME for c in claims)
        assert node_claims(box)  # still there while the run goes on

        # Test-only: the run's deadline cut to 1 s after it started (no Workspace field sets it).
        box.kubectl("patch", "workflow", workflow, "-n", tenant, "--type=merge",
                    "-p", json.dumps({"spec": {"activeDeadlineSeconds": 1}}))

        def failed():
            found = conditions(box, tenant).get("WorkspaceSucceeded")
            return found if found and found["reason"] == "workspaceFailed" else None

        condition = wait_until(failed, timeout=120, what="WorkspaceSucceeded=False after the deadline",
                               detail=lambda: operator.log()[-3000:] + json.dumps(
                                   (box.get("workflow", workflow, tenant) or {}).get("status"))[:4000])
        assert condition["status"] == "False"
        assert condition["message"].startswith("task tune failed"), condition
        assert "exceeded its deadline" in condition["message"], condition
        job = conditions(box, tenant)["JobStarted"]
        assert (job["status"], job["reason"]) == ("False", "Failed") and "exceeded its deadline" in job["message"], job
        status = box.get("workflow", workflow, tenant)["status"]
        assert status["phase"] == "Failed"
        tune = [n for n in status["nodes"].values() if n.get("type") == "Pod" and n["displayName"].startswith("tune")]
        assert tune and all(n["phase"] == "Failed" and "exceeded its deadline" in n.get("message", "") for n in tune)

        # Kaito #1107: the failed run's nodes are freed at once (the operator deletes its NodeClaims).
        wait_until(lambda: ((box.get("workspace.kaito.sh", NAME, tenant)["status"].get("pipeline") or {})
                            .get("lastRun") or {}).get("nodesReleased"), timeout=60,
                   what="lastRun.nodesReleased", detail=operator.log)
        assert node_claims(box) == []
        def told():  # the operator posts each Event just after the status patch it reports
            reasons = {e["reason"] for e in box.list("events", namespace=tenant) if e["involvedObject"]["name"] == NAME}
            return {"NodesReleased", "workspaceFailed"} <= reasons

        wait_until(told, timeout=60, what="the NodesReleased and workspaceFailed Events", detail=operator.log)
    finally:
        provisioned.set()
        hold.set()
    # The 63-character Workspace goes; its finalizer deletes its Workflow.
    box.kubectl("delete", "wks", NAME, "-n", tenant, "--timeout=120s", timeout=150)
    assert box.list("workflows.argoproj.io", namespace=tenant) == []
