"""The operator's run bookkeeping, ownership checks and watches on the real API server with Argo's
real controller (issue 17, items 2, 8 and 9).

* A generation's Workflow runs once: Argo's own TTL controller deletes the finished Workflow and
  no new one appears; a re-run annotation makes exactly one more; a failed run is retried after
  the back-off the status shows, up to ``--max-attempts``.
* Same-named objects kaiflow did not make are neither overwritten nor deleted.
* The operator's watches carry server-side label selectors: the cluster's other pods never reach it
  (a recording HTTP proxy between the operator and the API server shows each request and answer).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.cluster.conftest import phi3_gpu_node, workspace_file
from tests.fixtures.api_proxy import ApiProxy
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NODES = json.dumps(["aks-ws-node-0"])
RERUN = "kaiflow.kaito.sh/rerun"


def workflows(box, namespace):
    return box.list("workflows.argoproj.io", namespace=namespace)


def status(box, namespace, name):
    return (box.get("workspace.kaito.sh", name, namespace) or {}).get("status") or {}


def conditions(box, namespace, name):
    return {c["type"]: c for c in status(box, namespace, name).get("conditions") or []}


@pytest.fixture(scope="module")
def gpu_node(cluster_box):
    yield from phi3_gpu_node(cluster_box, "ownership-gpu-node")


def start_operator(installed, start_controller, *args, kubeconfig=None):
    kubeconfig = kubeconfig or installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    return start_controller(None, "--resync-s", "2", "--provider", "karpenter", "--verbose", *args,
                            kubeconfig=kubeconfig)


# ------------------------------------------------------------------------------- item 2


def test_a_generation_runs_once_after_argos_ttl_deletes_its_workflow_and_reruns_on_request(
        installed, tenant, start_controller, argo_agent, gpu_node):
    box = installed
    operator = start_operator(installed, start_controller, "--workflow-ttl-s", "1")
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    name = ws["metadata"]["name"]
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    box.apply(ws)
    first = wait_until(lambda: workflows(box, tenant), timeout=60, what="the first Workflow", detail=operator.log)[0]
    first_name = first["metadata"]["name"]
    # Argo's own TTL controller deletes the Workflow one second after it succeeded.
    wait_until(lambda: status(box, tenant, name).get("pipeline", {}).get("lastRun", {}).get("phase") == "Succeeded",
               timeout=240, what="the run to succeed", detail=operator.log)
    wait_until(lambda: not workflows(box, tenant), timeout=120, what="Argo's TTL to delete the Workflow",
               detail=operator.log)
    operator.wait_resyncs(tenant, name)  # the operator looked at the Workspace again (the passes counted)
    assert workflows(box, tenant) == [], "the operator made the generation's Workflow again"
    record = status(box, tenant, name)["pipeline"]
    assert (record["name"], record["generation"], record["run"]) == (first_name, 1, 1), record
    assert record["lastRun"]["phase"] == "Succeeded"

    # An explicit re-run: one more Workflow, and only one, for the same token.
    box.kubectl("annotate", "wks", name, "-n", tenant, f"{RERUN}=again-1", "--overwrite")
    again = wait_until(lambda: workflows(box, tenant), timeout=60, what="the re-run Workflow", detail=operator.log)
    assert [w["metadata"]["name"] for w in again] == [f"{first_name}-r2"]
    wait_until(lambda: status(box, tenant, name)["pipeline"].get("run") == 2, timeout=60, what="run 2 recorded")
    assert status(box, tenant, name)["pipeline"]["rerunToken"] == "again-1"
    wait_until(lambda: not workflows(box, tenant), timeout=240, what="the re-run to finish and be deleted",
               detail=operator.log)
    operator.wait_resyncs(tenant, name)
    assert workflows(box, tenant) == []


def test_a_failed_run_is_retried_after_the_back_off_the_status_shows_up_to_the_cap(
        installed, tenant, start_controller, argo_agent, gpu_node):
    box = installed
    operator = start_operator(installed, start_controller, "--retry-backoff-s", "4", "--max-attempts", "2",
                              "--workflow-ttl-s", "3600")
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    name = ws["metadata"]["name"]
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    argo_agent.script(tenant, "tune", Outcome(exit_code=1, message="error: CUDA error: unspecified launch failure"))
    box.apply(ws)

    def retry_planned():
        record = status(box, tenant, name).get("pipeline") or {}
        return record if record.get("nextRetryAt") else None

    record = wait_until(retry_planned, timeout=240, what="a retry in the status", detail=operator.log)
    assert record["attempt"] == 1 and record["maxAttempts"] == 2 and "attempt 2 of 2" in record["retry"], record
    retried = wait_until(lambda: [w for w in workflows(box, tenant) if w["metadata"]["name"].endswith("-r2")],
                         timeout=60, what="the retry Workflow", detail=operator.log)
    assert len(retried) == 1

    def exhausted():
        record = status(box, tenant, name).get("pipeline") or {}
        return record if record.get("run") == 2 and "not retried" in (record.get("retry") or "") else None

    record = wait_until(exhausted, timeout=240, what="the cap reached", detail=operator.log)
    assert "nextRetryAt" not in record and "2 of 2 attempts" in record["retry"], record
    operator.wait_resyncs(tenant, name)
    assert len(workflows(box, tenant)) == 2, [w["metadata"]["name"] for w in workflows(box, tenant)]


# ------------------------------------------------------------------------------- item 9


def foreign_workflow(kind: str, name: str, namespace: str) -> dict:
    spec = {"entrypoint": "main", "templates": [{"name": "main", "suspend": {}}]}
    body = {"apiVersion": "argoproj.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "labels": {"team": "someone-else"}}}
    if kind == "CronWorkflow":
        body["spec"] = {"schedule": "0 0 1 1 *", "suspend": True, "workflowSpec": spec}
    else:
        body["spec"] = {**spec, "suspend": True}
    return body


def test_same_named_workflow_and_cron_workflow_of_someone_else_are_left_alone(
        installed, tenant, start_controller, argo_agent, gpu_node):
    box = installed
    operator = start_operator(installed, start_controller)

    scheduled = workspace_file("scheduled_tuning_phi_3.yaml", tenant, name="nightly")
    theirs = foreign_workflow("CronWorkflow", "nightly-tuning", tenant)
    box.apply(theirs)
    once = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant, name="once")
    other = foreign_workflow("Workflow", "once-tuning-1", tenant)
    # Owned by something else in the namespace (the old code deleted any Workflow of another owner).
    cm = box.kubectl("create", "configmap", "owner", "-n", tenant, "-o", "json")
    uid = json.loads(cm.stdout)["metadata"]["uid"]
    other["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]
    box.apply(other)
    before = box.get("workflow", "once-tuning-1", tenant)["metadata"]["uid"]
    box.apply(scheduled, once)

    for ws in ("nightly", "once"):
        found = wait_until(lambda ws=ws: (conditions(box, tenant, ws).get("WorkspaceSucceeded") or {}).get("reason")
                           == "PipelineNameTaken" or None, timeout=60, what=f"{ws} refused", detail=operator.log)
        assert found
    assert "not made by kaiflow" in conditions(box, tenant, "once")["WorkspaceSucceeded"]["message"]
    operator.wait_resyncs(tenant, "nightly", "once")
    cron = box.get("cronworkflow", "nightly-tuning", tenant)
    assert cron["spec"]["schedule"] == "0 0 1 1 *" and "app.kubernetes.io/managed-by" not in cron["metadata"]["labels"]
    assert box.get("workflow", "once-tuning-1", tenant)["metadata"]["uid"] == before

    # Deleting the Workspace leaves them too, even when they carry kaiflow's workspace label.
    box.kubectl("label", "cronworkflow", "nightly-tuning", "-n", tenant, "kaito.sh/workspace=nightly",
                "app.kubernetes.io/managed-by=kaiflow")
    box.kubectl("delete", "wks", "nightly", "-n", tenant, "--timeout=60s", timeout=90)
    assert box.get("cronworkflow", "nightly-tuning", tenant) is not None


# ------------------------------------------------------------------------------- item 8


def test_the_operator_never_receives_unrelated_pods_deployments_or_workflows(
        installed, tenant, start_controller, tmp_path):
    box = installed
    # Many pods, Deployments and Workflows of other teams, some in the Workspace's own namespace.
    unrelated = [{"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": f"unrelated-pod-{i}", "namespace": tenant, "labels": {"app": "web"}},
                  "spec": {"nodeName": "no-such-node", "containers": [{"name": "c", "image": "nginx"}]}}
                 for i in range(120)]
    unrelated.append({"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": {"name": "unrelated-deployment", "namespace": tenant},
                      "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "x"}},
                               "template": {"metadata": {"labels": {"app": "x"}},
                                            "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}})
    unrelated.append(foreign_workflow("Workflow", "unrelated-workflow", tenant))
    box.apply(*unrelated)

    token = box.token("kaiflow-controller", "kaiflow-system")
    proxy = ApiProxy(box.server, str(box.pki.ca))
    kubeconfig = proxy.kubeconfig(tmp_path / "proxied.kubeconfig", token)
    try:
        operator = start_operator(installed, start_controller, kubeconfig=kubeconfig)

        def requests():
            return [f"{e.method} {e.path}" for e in proxy.record()]

        def watching():
            return [r for r in requests() if "watch=" in r and ("/pods?" in r or "/deployments?" in r
                                                                 or "/workflows?" in r)]

        wait_until(lambda: len({r.split("?")[0] for r in watching()}) >= 3, timeout=60,
                   what="the operator's watches", detail=lambda: "\n".join(requests()) + operator.log())
        # A new unrelated pod while it watches.
        box.apply({**unrelated[0], "metadata": {**unrelated[0]["metadata"], "name": "unrelated-pod-late"}})
        time.sleep(3)
        record = proxy.record()
        answers = b"".join(bytes(e.answer) for e in record)
        for request in (f"{e.method} {e.path}" for e in record):
            if any(f"/{kind}?" in request or request.endswith(f"/{kind}") for kind in ("pods", "deployments", "workflows")):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.split(" ", 1)[1]).query)
                assert "app.kubernetes.io/managed-by=kaiflow" in (query.get("labelSelector") or [""])[0], request
        assert b"unrelated-pod-" not in answers
        assert b"unrelated-deployment" not in answers and b"unrelated-workflow" not in answers
    finally:
        proxy.stop()
