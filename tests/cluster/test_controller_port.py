"""Cases of tests/controller/test_operator.py (the emulator) that the box did not cover yet, on the
real API server, as the operator's own ServiceAccount, with Argo's real controller (issue 16, "The
controller suite on the real API server").

* One Workspace through two generations: the status subresource (the operator's status writes,
  as field manager ``kaiflow``, leave ``metadata.generation`` alone; a user's write of ``status``
  through the main resource conflicts with them, and forced, is dropped by the server), the columns ``kubectl get wks`` prints, a spec change making generation
  2's Workflow while Argo stops generation 1's (``shutdown: Terminate``), the CRD's CEL rules and
  enum refusing immutable and unknown values by the server itself, and the finalizer: deleting the
  Workspace releases its NodeClaims, leaves the ones kaiflow did not make for it, and lets the
  Workspace go after ``--delete-deadline-s`` when a claim never finishes deleting (Kaito #932; here
  a claim held by another controller's finalizer, as Karpenter holds one while it drains a node).
* A Workspace the operator's own rules refuse (a plain-http dataset URL, which the CRD accepts): a
  condition naming the field, a Warning Event, state Failed and no Workflow.
* A scheduled Workspace: its CronWorkflow, run at once with ``argo submit --from cronwf/...``
  (Argo's own way, instead of waiting for the schedule), runs on Argo; the status shows the run as
  ``pipeline.lastRun`` with the eval gate's decision; deleting the Workspace deletes the CronWorkflow.
* Owner-reference garbage collection by kube-controller-manager itself: with the operator gone
  and its finalizer removed by hand, deleting the Workspace deletes its Workflow and Argo's pods.
  (With the operator running, its finalizer deletes the Workflows first: test_operator.py's
  deletion test shows that path.)
"""

from __future__ import annotations

import copy
import json
import subprocess
import threading

import pytest
import yaml

from api.labels import ANNOTATION_OWNER, FINALIZER, LABEL_GENERATION, LABEL_WORKSPACE, owner_annotation
from tests.cluster.conftest import workspace_file
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import GPU_TAINT, wait_until

EXAMPLE = "kaito_workspace_tuning_phi_3.yaml"
HELD = Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"})


@pytest.fixture
def operator(installed, tenant, start_controller):
    kubeconfig = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    return start_controller(None, "--resync-s", "5", "--provider", "karpenter", "--namespace", tenant,
                            "--delete-deadline-s", "6", "--max-attempts", "1", kubeconfig=kubeconfig)


@pytest.fixture
def held(argo_agent, tenant):
    """Argo's provision-nodes pods in the tenant wait until the test ends: the runs stay Running."""
    hold = threading.Event()
    argo_agent.script(tenant, "provision-nodes", HELD, hold=hold)
    yield hold
    hold.set()


def workspace(box, namespace: str, name: str) -> dict:
    return box.get("workspace.kaito.sh", name, namespace) or {}


def condition(box, namespace: str, name: str, kind: str) -> dict:
    return next((c for c in (workspace(box, namespace, name).get("status") or {}).get("conditions") or []
                 if c["type"] == kind), {})


def workflows(box, namespace: str, name: str, generation: int | None = None) -> list[dict]:
    selector = f"{LABEL_WORKSPACE}={name}" + (f",{LABEL_GENERATION}={generation}" if generation else "")
    return box.list("workflows.argoproj.io", namespace=namespace, selector=selector)


def reasons(box, namespace: str, name: str) -> list[str]:
    events = [e for e in box.list("events", namespace=namespace) if e["involvedObject"]["name"] == name]
    return [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]


def test_one_workspace_through_generations_the_status_subresource_cel_and_the_finalizer(
        installed, tenant, operator, held):
    box = installed
    name = "generations"
    ws = workspace_file(EXAMPLE, tenant, name=name)
    box.apply(ws)
    [first] = wait_until(lambda: workflows(box, tenant, name, 1), timeout=60, what="generation 1's Workflow",
                         detail=operator.log)
    assert first["metadata"]["name"] == f"{name}-tuning-1"
    wait_until(lambda: (workspace(box, tenant, name).get("status") or {}).get("observedGeneration") == 1
               and condition(box, tenant, name, "JobStarted"), timeout=60, what="the status of generation 1",
               detail=operator.log)
    body = workspace(box, tenant, name)
    assert FINALIZER in body["metadata"]["finalizers"]
    assert first["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]

    # The status subresource: the operator's writes went to /status (generation unchanged) ...
    assert body["metadata"]["generation"] == 1
    # ... as field manager kaiflow; a user's status written through the main resource conflicts with
    # it, and forced, is dropped by the server.
    forged = {**copy.deepcopy(ws), "status": {"state": "Succeeded", "conditions": [{
        "type": "Forged", "status": "True", "reason": "Forged", "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}}
    conflict = box.kubectl("apply", "--server-side", "--field-manager=kaiflow-tests", "-f", "-",
                           input=yaml.safe_dump(forged), check=False)
    assert conflict.returncode != 0, conflict.stdout
    assert 'conflicts with "kaiflow" with subresource "status"' in conflict.stderr, conflict.stderr
    answer = json.loads(box.kubectl("apply", "--server-side", "--field-manager=kaiflow-tests", "--force-conflicts",
                                    "-o", "json", "-f", "-", input=yaml.safe_dump(forged)).stdout)
    assert answer["metadata"]["generation"] == 1
    assert "Forged" not in {c["type"] for c in answer["status"]["conditions"]}
    assert answer["status"].get("state") != "Succeeded"

    # The columns the API server prints from the CRD.
    table = box.kubectl("get", "wks", name, "-n", tenant).stdout.splitlines()
    assert table[0].split() == ["NAME", "INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "JOBSTARTED",
                                "WORKSPACESUCCEEDED", "TARGETNODECOUNT", "STATE", "AGE"]
    row = table[1].split()
    assert row[:3] == [name, "Standard_NC6s_v3", "False"] and row[6] == "1" and row[7] in ("Pending", "Running"), row

    # A spec change: generation 2 gets its Workflow, Argo stops generation 1's.
    ws["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
    box.apply(ws)
    [second] = wait_until(lambda: workflows(box, tenant, name, 2), timeout=60, what="generation 2's Workflow",
                          detail=operator.log)
    assert second["metadata"]["name"] == f"{name}-tuning-2"

    def stopped():
        run = box.get("workflow", first["metadata"]["name"], tenant)
        return run if (run["status"] or {}).get("phase") in ("Failed", "Error") else None

    run = wait_until(stopped, timeout=120, what="Argo to stop generation 1's Workflow", detail=operator.log)
    assert run["spec"]["shutdown"] == "Terminate"
    assert "Terminate" in run["status"].get("message", ""), run["status"].get("message")
    wait_until(lambda: workspace(box, tenant, name)["status"].get("observedGeneration") == 2, timeout=60,
               what="observedGeneration 2", detail=operator.log)
    assert workspace(box, tenant, name)["metadata"]["generation"] == 2

    # The CRD's rules, enforced by the API server (the emulator left them to the operator).
    immutable = copy.deepcopy(ws)
    immutable["tuning"]["method"] = "lora"
    immutable["resource"]["instanceType"] = "Standard_NC24ads_A100_v4"
    immutable["resource"]["labelSelector"] = {"matchLabels": {"app": "elsewhere"}}
    refused = box.apply(immutable, check=False)
    assert refused.returncode != 0
    for message in ("tuning.method is immutable", "resource.instanceType is immutable",
                    "resource.labelSelector is immutable"):
        assert message in refused.stderr, refused.stderr
    unknown = copy.deepcopy(ws)
    unknown["tuning"]["method"] = "dora"
    refused = box.apply(unknown, check=False)
    assert refused.returncode != 0 and "tuning.method" in refused.stderr and "dora" in refused.stderr, refused.stderr
    assert workspace(box, tenant, name)["metadata"]["generation"] == 2

    # The finalizer: the operator's NodeClaims for this Workspace go; a claim of another Workspace and
    # one without kaiflow's owner mark stay; one whose deletion never finishes (another controller's
    # finalizer) holds the Workspace only until --delete-deadline-s.
    ours = wait_until(lambda: box.list("nodeclaims.karpenter.sh", selector=f"{LABEL_WORKSPACE}={name}"),
                      timeout=60, what="the NodeClaims the operator requested", detail=operator.log)
    template = ours[0]

    def claim(suffix: str, workspace_name: str, owned: bool, finalizers: list[str] | None = None) -> str:
        labels = {**template["metadata"]["labels"], LABEL_WORKSPACE: workspace_name}
        meta = {"name": f"{tenant}-{suffix}", "labels": labels,
                "annotations": {ANNOTATION_OWNER: owner_annotation(tenant, workspace_name)} if owned else {}}
        if finalizers:
            meta["finalizers"] = finalizers
        box.apply({"apiVersion": template["apiVersion"], "kind": "NodeClaim", "metadata": meta,
                   "spec": template["spec"]})
        return meta["name"]

    stuck = claim("stuck", name, owned=True, finalizers=["example.com/draining"])
    foreign = claim("foreign", name, owned=False)
    other = claim("other", "another-workspace", owned=True)
    try:
        box.kubectl("delete", "wks", name, "-n", tenant, "--timeout=120s", timeout=150)
        assert box.get("workspace.kaito.sh", name, tenant) is None
        story = reasons(box, tenant, name)
        assert story.index("Deleting") < story.index("ReleaseDeadlineExceeded")
        assert workflows(box, tenant, name) == []
        for gone in ours:
            assert box.get("nodeclaim", gone["metadata"]["name"]) is None
        assert box.get("nodeclaim", stuck)["metadata"].get("deletionTimestamp")  # asked to go, still draining
        for kept in (foreign, other):
            assert not box.get("nodeclaim", kept)["metadata"].get("deletionTimestamp"), kept
    finally:
        box.kubectl("patch", "nodeclaim", stuck, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        box.kubectl("delete", "nodeclaim", stuck, foreign, other, "--wait=false", "--ignore-not-found", check=False)


def test_a_workspace_the_operator_refuses_gets_a_condition_a_warning_and_no_workflow(installed, tenant, operator):
    box = installed
    name = "plain-http"
    ws = workspace_file(EXAMPLE, tenant, name=name)
    ws["tuning"]["input"]["urls"] = ["http://example.com/data.parquet"]
    box.apply(ws)  # the CRD allows http (local runs); the operator refuses it in a cluster

    def refused():
        found = condition(box, tenant, name, "WorkspaceSucceeded")
        return found if found.get("reason") == "InvalidWorkspace" else None

    found = wait_until(refused, timeout=60, what="the InvalidWorkspace condition", detail=operator.log)
    assert found["status"] == "False" and "tuning.input.urls[0]" in found["message"], found
    assert workspace(box, tenant, name)["status"]["state"] == "Failed"
    # the reconcile that wrote the refusal returned before making anything
    assert workflows(box, tenant, name) == []
    def warned():  # the operator posts the Event just after its status patch: the condition can be seen first
        events = [e for e in box.list("events", namespace=tenant) if e["involvedObject"]["name"] == name]
        return any(e["reason"] == "InvalidWorkspace" and e["type"] == "Warning" for e in events)

    wait_until(warned, timeout=60, what="the InvalidWorkspace Warning Event", detail=operator.log)
    box.kubectl("delete", "wks", name, "-n", tenant, "--timeout=60s", timeout=90)  # its finalizer, while it runs


def test_the_garbage_collector_deletes_the_workflow_of_a_deleted_workspace(installed, tenant, operator, held):
    box = installed
    name = "collected"
    box.apply(workspace_file(EXAMPLE, tenant, name=name))
    [run] = wait_until(lambda: workflows(box, tenant, name), timeout=60, what="the Workflow", detail=operator.log)
    uid = workspace(box, tenant, name)["metadata"]["uid"]
    [owner] = run["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (
        "Workspace", name, uid, True, True)
    pod_selector = f"workflows.argoproj.io/workflow={run['metadata']['name']}"
    wait_until(lambda: box.list("pods", namespace=tenant, selector=pod_selector), timeout=120,
               what="Argo's first pod of the run")

    operator.stop()  # nobody runs the finalizer now: only the owner references are left
    box.kubectl("patch", "wks", name, "-n", tenant, "--type=json",
                "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))
    box.kubectl("delete", "wks", name, "-n", tenant, "--timeout=60s", timeout=90)
    wait_until(lambda: not workflows(box, tenant, name), timeout=120,
               what="kube-controller-manager's garbage collector to delete the Workflow")
    wait_until(lambda: not box.list("pods", namespace=tenant, selector=pod_selector), timeout=120,
               what="the garbage collector to delete Argo's pods (owned by the Workflow)")


@pytest.fixture(scope="module")
def weekly_node(cluster_box):
    """A node for the scheduled example's tune and gate pods (labelSelector app=tuning-phi-3-weekly)."""
    name = "port-weekly-gpu-node"
    if cluster_box.get("node", name) is None:
        cluster_box.add_node(name, gpus=1, labels={"app": "tuning-phi-3-weekly",
                                                   "node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4"},
                             taints=[GPU_TAINT, {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
    yield name
    cluster_box.kubectl("delete", "node", name, "--wait=false", check=False)


def test_a_scheduled_workspace_shows_its_last_run_and_the_gates_decision(installed, tenant, operator, argo_agent,
                                                                         weekly_node):
    box = installed
    name = "weekly"
    argo_agent.script(tenant, "provision-nodes", HELD)
    argo_agent.script(tenant, "eval-gate", Outcome(outputs={"promote": "false", "current-eval-loss": "0.4"}))
    box.apply(workspace_file("scheduled_tuning_phi_3.yaml", tenant, name=name))
    [cron] = wait_until(lambda: box.list("cronworkflows.argoproj.io", namespace=tenant), timeout=60,
                        what="the CronWorkflow", detail=operator.log)
    submitted = subprocess.run([str(box.bin / "argo"), "submit", "--from", f"cronwf/{cron['metadata']['name']}",
                                "-n", tenant, "-o", "name"], capture_output=True, text=True, timeout=120,
                               env={"KUBECONFIG": str(box.kubeconfig), "PATH": "/usr/bin:/bin"})
    assert submitted.returncode == 0, submitted.stderr
    run = submitted.stdout.strip()

    def finished():
        pipeline = (workspace(box, tenant, name).get("status") or {}).get("pipeline") or {}
        last = pipeline.get("lastRun") or {}
        return pipeline if last.get("name") == run and last.get("phase") in ("Succeeded", "Failed", "Error") else None

    pipeline = wait_until(finished, timeout=240, what="the run's result in the status",
                          detail=lambda: operator.log()[-3000:] + "\n".join(argo_agent.errors) + json.dumps(
                              (box.get("workflow", run, tenant) or {}).get("status"))[:4000])
    assert pipeline["kind"] == "CronWorkflow" and pipeline["name"] == cron["metadata"]["name"], pipeline
    assert pipeline["lastRun"]["phase"] == "Succeeded" and pipeline["lastRun"]["promoted"] is False, pipeline
    assert workspace(box, tenant, name)["status"]["state"] == "Succeeded"
    box.kubectl("delete", "wks", name, "-n", tenant, "--timeout=120s", timeout=150)
    assert box.list("cronworkflows.argoproj.io", namespace=tenant) == []
