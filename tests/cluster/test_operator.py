"""The operator on the real API server, as its own ServiceAccount, with Argo's real controller.

``kaiflow controller`` runs as a process with a token of ``kaiflow-system/kaiflow-controller`` (never
as admin: a verb the install lacks fails here). Argo's workflow-controller schedules the Workflows it
creates; the box's node agent finishes their pods (tests/fixtures/argo_agent.py). What is checked:
the Workflow Argo accepts and runs, the pod specs Argo makes from it, the Workspace's conditions in
order, kubectl as Kaito users type it, the CRD's CEL rules refused by the server, owner-reference
garbage collection, and names at the 63-character limit.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.conftest import workspace_file
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import GPU_TAINT, wait_until

NODES = json.dumps(["aks-ws-node-0"])


@pytest.fixture
def operator(installed, start_controller):
    kubeconfig = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    return start_controller(None, "--resync-s", "5", "--provider", "karpenter", kubeconfig=kubeconfig)


@pytest.fixture(scope="module")
def gpu_node(cluster_box):
    """A node like the one provision-nodes would have made for the phi-3 examples (labelSelector app=phi-3-adapter)."""
    cluster_box.add_node("phi-3-gpu-node", gpus=1, labels={"app": "phi-3-adapter", "apps": "phi-3",
                                                           "node.kubernetes.io/instance-type": "Standard_NC6s_v3"},
                         taints=[GPU_TAINT, {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
    return "phi-3-gpu-node"


def conditions(box, namespace, name):
    ws = box.get("workspace.kaito.sh", name, namespace) or {}
    return {c["type"]: c for c in (ws.get("status") or {}).get("conditions") or []}


def workflows(box, namespace):
    return box.list("workflows.argoproj.io", namespace=namespace)


def test_tuning_workspace_runs_on_argo_and_its_status_follows(installed, tenant, operator, argo_agent, gpu_node):
    box = installed
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    name = ws["metadata"]["name"]
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    argo_agent.script(tenant, "tune", Outcome(outputs={"train-loss": "0.25", "eval-loss": "0.5", "tokens-per-second": "1234"}))
    box.apply(ws)
    run = wait_until(lambda: workflows(box, tenant), timeout=60, what="the operator's Workflow",
                     detail=operator.log)[0]
    assert run["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    done = box.kubectl("wait", "--for=condition=WorkspaceSucceeded", f"workspace.kaito.sh/{name}", "-n", tenant,
                       "--timeout=240s", check=False, timeout=300)
    assert done.returncode == 0, (done.stderr + operator.log()[-3000:] + "\n".join(argo_agent.errors)
                                  + json.dumps(box.get("workflow", run["metadata"]["name"], tenant).get("status"))[:6000]
                                  + json.dumps(box.get("workspace.kaito.sh", name, tenant).get("status"))[:3000])

    run = box.get("workflow", run["metadata"]["name"], tenant)
    assert run["status"]["phase"] == "Succeeded"
    tasks = [f["template"] for f in argo_agent.finished if f["namespace"] == tenant]
    assert tasks.index("provision-nodes") < tasks.index("fetch-dataset") < tasks.index("tune")
    assert [n for n in run["status"]["nodes"].values() if n["type"] == "Pod" and n["phase"] != "Succeeded"] == []

    # The columns `kubectl get wks` prints come from the CRD, printed by the API server.
    table = box.kubectl("get", "wks", "-n", tenant).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "INSTANCE", "RESOURCEREADY"]
    assert table[1].split()[0] == name and "Succeeded" in table[1]
    # The conditions' story, in the API server's own order (Events by resourceVersion).
    def story():  # the operator posts each Event just after the status patch it reports
        events = [e for e in box.list("events", namespace=tenant) if e["involvedObject"]["name"] == name]
        told = [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]
        return told if "workspaceSucceeded" in told else None

    reasons = wait_until(story, timeout=60, what="the workspaceSucceeded Event", detail=operator.log)
    assert reasons.index("Provisioning") < reasons.index("Provisioned") < reasons.index("Started") \
        < reasons.index("workspaceSucceeded"), reasons
    assert "Events:" in box.kubectl("describe", "wks", name, "-n", tenant).stdout
    # Argo evaluated the tune template's metrics from the outputs the step reported (Argo 3.6+
    # prefixes custom metrics with argo_workflows_).
    metrics = box.argo_metrics()
    assert any(line.startswith("argo_workflows_kaiflow_tune_eval_loss{") and line.rstrip().endswith(" 0.5")
               for line in metrics.splitlines()), [l for l in metrics.splitlines() if "kaiflow" in l]


def test_pods_argo_makes_carry_the_rendered_pod_spec(installed, tenant, operator, argo_agent, gpu_node):
    box = installed
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    hold_tune = __import__("threading").Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    argo_agent.script(tenant, "tune", Outcome(), hold=hold_tune)
    box.apply(ws)
    try:
        pod = wait_until(lambda: [p for p in box.list("pods", namespace=tenant)
                                  if p["metadata"].get("annotations", {}).get("workflows.argoproj.io/node-name", "").endswith(".tune")
                                  and p["status"].get("phase") == "Running"],
                         timeout=180, what="the tune pod Running", detail=operator.log)[0]
        spec = pod["spec"]
        main = next(c for c in spec["containers"] if c["name"] == "main")
        assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"] == {"app": "phi-3-adapter"}
        # the scheduler placed it on a node with those labels and the GPU taint (the module's own
        # node, or another test's node that carries the same labels: either is right)
        node = box.get("node", spec["nodeName"])
        if node is not None:  # another module's node may already be released
            assert node["metadata"]["labels"]["app"] == "phi-3-adapter", spec["nodeName"]
            assert any(t["key"] == "sku" for t in node["spec"]["taints"])
        assert any(t["key"] == "sku" for t in spec["tolerations"])
        assert spec["serviceAccountName"] == "kaiflow-workflow"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert any(v.get("persistentVolumeClaim") for v in spec["volumes"])  # the data volume, bound by the box
    finally:
        hold_tune.set()


def test_a_failed_step_names_the_task_exit_code_and_message(installed, tenant, operator, argo_agent, gpu_node):
    box = installed
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    name = ws["metadata"]["name"]
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    argo_agent.script(tenant, "fetch-dataset", Outcome(exit_code=2, message="error: row 3: column 'messages' is missing"))
    box.apply(ws)

    def failed():
        found = conditions(box, tenant, name).get("WorkspaceSucceeded")
        return found if found and found["status"] == "False" and found["reason"] != "workspacePending" else None

    condition = wait_until(failed, timeout=240, what="WorkspaceSucceeded=False", detail=operator.log)
    assert "fetch-dataset" in condition["message"] and "exit code 2" in condition["message"], condition
    assert "row 3" in condition["message"], condition
    attempts = [f for f in argo_agent.finished if f["namespace"] == tenant and f["template"] == "fetch-dataset"]
    assert len(attempts) == 1  # exit code 2 is not retried (retryStrategy expression)


def test_the_api_server_refuses_a_changed_preset_with_the_crds_cel_rule(installed, tenant):
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    installed.apply(ws)
    ws["tuning"]["preset"]["name"] = "qwen2.5-coder-7b-instruct"
    refused = installed.apply(ws, check=False)
    assert refused.returncode != 0
    assert "immutable" in refused.stderr.lower() or "Invalid value" in refused.stderr, refused.stderr


def test_deleting_the_workspace_collects_its_workflows(installed, tenant, operator, argo_agent, gpu_node):
    box = installed
    ws = workspace_file("kaito_workspace_tuning_phi_3.yaml", tenant)
    hold = __import__("threading").Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}), hold=hold)
    box.apply(ws)
    try:
        wait_until(lambda: workflows(box, tenant), timeout=60, what="the Workflow", detail=operator.log)
    finally:
        hold.set()
    box.kubectl("delete", "wks", ws["metadata"]["name"], "-n", tenant, "--timeout=120s", timeout=150)
    wait_until(lambda: not workflows(box, tenant), timeout=120,
               what="the garbage collector to delete the Workspace's Workflows")


def test_a_63_character_workspace_name_gives_valid_names_and_its_cron_workflow_fires(
        installed, tenant, operator, argo_agent, gpu_node):
    box = installed
    name = "w" * 63
    ws = workspace_file("scheduled_tuning_phi_3.yaml", tenant, name=name)
    ws["tuning"]["schedule"] = "* * * * *"
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": NODES, "provider": "karpenter"}))
    box.apply(ws)
    cron = wait_until(lambda: box.list("cronworkflows.argoproj.io", namespace=tenant), timeout=60,
                      what="the CronWorkflow", detail=operator.log)[0]
    assert len(cron["metadata"]["name"]) <= 52
    fired = wait_until(lambda: [w for w in workflows(box, tenant)], timeout=150,
                       what="the CronWorkflow to fire (one-minute schedule)",
                       detail=lambda: json.dumps(box.get("cronworkflow", cron["metadata"]["name"], tenant).get("status")))
    assert fired
    for obj in [*box.list("workflows.argoproj.io", namespace=tenant), *box.list("services", namespace=tenant)]:
        assert len(obj["metadata"]["name"]) <= 63
        for value in (obj["metadata"].get("labels") or {}).values():
            assert len(value) <= 63
