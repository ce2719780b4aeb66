"""The operator as a process against a real HTTP API server, driven with real kubectl.

Argo's part is played by ``tests/fixtures/argo.py`` (script mode: each task's status as Argo
writes it, no training); the operator (``kaiflow controller``) runs as its own process so that
SIGKILL is real. Kaito users' path: ``kubectl apply`` → ``kubectl get wks`` → ``kubectl wait`` →
``kubectl delete``.

On the real API server (the cluster box, tests/cluster/), with Argo's own controller, these cases
run too: apply/get/wait/describe and the events' order (test_operator.py), the finalizer's NodeClaim
release (test_controller_port.py), the operator's own refusal and the CRD's rules refusing changed
immutable fields and unknown values (test_controller_port.py, test_operator.py), a spec change's
next generation (test_controller_port.py, test_relist.py), a failed task's condition
(test_operator.py), SIGKILL of the acting operator (test_leader.py), the API server cut off
(test_relist.py, which also makes the resumed watch get 410 Gone), the deletion deadline
(test_controller_port.py), a failed run freeing its nodes (test_deadline.py) and a scheduled run's
status (test_controller_port.py). Kept here only, each saying why in its docstring: fifty
Workspaces at once, the opt-in annotation, crash-looping pods.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from api.labels import ANNOTATION_OWNER, LABEL_WORKSPACE, LABEL_WORKSPACE_NAMESPACE, owner_annotation

from tests.fixtures.argo import play_argo
from tests.fixtures.kaiflow_controller import ApiProxy, proxied_kubeconfig, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WS = "/apis/kaito.sh/v1beta1/namespaces/default/workspaces"
WF = "/apis/argoproj.io/v1alpha1/namespaces/default/workflows"
TUNING = "workspace-tuning-phi-3-mini"


def workflows(kube, name=None):
    items = kube.list(WF)
    return [w for w in items if name is None or w["metadata"]["labels"].get("kaito.sh/workspace") == name]


def condition(kube, name, type_):
    ws = kube.get(f"{WS}/{name}")
    return next((c for c in (ws.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def test_apply_get_wait_delete(kaito_kube, kubectl, start_controller):
    controller = start_controller(kaito_kube, "--resync-s", "5")
    with play_argo(kaito_kube, task_delay=0.05):
        kubectl("apply", "-f", str(EXAMPLES / "kaito_workspace_tuning_phi_3.yaml"))
        wait_for(lambda: workflows(kaito_kube, TUNING), what="the Workflow", on_fail=controller.log)
        wait = kubectl("wait", "--for=condition=WorkspaceSucceeded", f"wks/{TUNING}", "--timeout=60s", check=False,
                       timeout=90)
        assert wait.returncode == 0, wait.stderr + controller.log()[-4000:]
        table = kubectl("get", "wks").stdout.splitlines()
        assert table[0].split() == ["NAME", "INSTANCE", "RESOURCEREADY", "INFERENCEREADY", "JOBSTARTED",
                                    "WORKSPACESUCCEEDED", "TARGETNODECOUNT", "STATE", "AGE"]
        assert table[1].split()[:8] == [TUNING, "Standard_NC6s_v3", "True", "True", "True", "True", "1", "Succeeded"]

    (workflow,) = workflows(kaito_kube, TUNING)
    assert workflow["metadata"]["name"] == f"{TUNING}-tuning-1"
    ws = kaito_kube.get(f"{WS}/{TUNING}")
    assert workflow["metadata"]["ownerReferences"][0]["uid"] == ws["metadata"]["uid"]
    assert ws["status"]["observedGeneration"] == 1 and ws["status"]["workerNodes"] == ["aks-ws-node-0"]
    # kubectl describe tells the story, in order (the operator posts each Event just after the status
    # patch it reports: the last one can come after `kubectl wait` saw the condition).
    wait_for(lambda: "workspaceSucceeded" in {e["reason"] for e in _events(kaito_kube, TUNING)},
             what="the workspaceSucceeded Event", on_fail=controller.log)
    story = kubectl("describe", "wks", TUNING).stdout.split("\nEvents:")[1]
    for reason in ("Provisioning", "Provisioned", "Started", "SmokeTestPassed", "workspaceSucceeded"):
        assert reason in story, story
    # describe sorts by second-granular timestamps; the API server's numbering gives the real order.
    reasons = [e["reason"] for e in sorted(_events(kaito_kube, TUNING), key=lambda e: int(e["metadata"]["resourceVersion"]))]
    assert reasons.index("Provisioning") < reasons.index("Started") < reasons.index("workspaceSucceeded")

    # The finalizer releases the NodeClaims the provision task labelled for the Workspace.
    _node_claim(kaito_kube, "ws-claim-0", TUNING)
    _node_claim(kaito_kube, "other-claim", "other")
    # same labels, but not made by kaiflow's provision step (no owner annotation): left alone
    kaito_kube.create("/apis/karpenter.sh/v1/nodeclaims", {
        "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "spec": {}, "metadata": {
            "name": "someone-elses", "labels": {"kaito.sh/workspace": TUNING, "kaito.sh/workspacenamespace": "default"}}})
    kubectl("delete", "wks", TUNING, "--timeout=60s", timeout=90)
    assert sorted(c["metadata"]["name"] for c in kaito_kube.list("/apis/karpenter.sh/v1/nodeclaims")) == [
        "other-claim", "someone-elses"]
    assert kubectl("get", "wks", "-o", "name").stdout.strip() == ""


def test_invalid_workspace_gets_a_condition_naming_the_field_and_no_workflow(kaito_kube, kubectl, start_controller):
    controller = start_controller(kaito_kube)
    bad = yaml.safe_load((EXAMPLES / "kaito_workspace_tuning_phi_3.yaml").read_text())
    bad["metadata"]["name"] = "bad-method"
    bad["tuning"]["method"] = "dora"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))
    cond = wait_for(lambda: condition(kaito_kube, "bad-method", "WorkspaceSucceeded"), what="the condition",
                    on_fail=controller.log)
    assert (cond["status"], cond["reason"]) == ("False", "InvalidWorkspace")
    assert "tuning.method" in cond["message"]
    assert kaito_kube.get(f"{WS}/bad-method")["status"]["state"] == "Failed"
    time.sleep(1)
    assert workflows(kaito_kube, "bad-method") == []
    wait_for(lambda: any(e["reason"] == "InvalidWorkspace" and e["type"] == "Warning" for e in _events(kaito_kube, "bad-method")),
             what="the InvalidWorkspace Warning Event", on_fail=controller.log)


def test_spec_change_makes_the_next_generation_and_immutable_fields_are_refused(kaito_kube, kubectl, start_controller):
    controller = start_controller(kaito_kube)
    with play_argo(kaito_kube):
        spec = yaml.safe_load((EXAMPLES / "kaito_workspace_tuning_phi_3.yaml").read_text())
        kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))
        wait_for(lambda: workflows(kaito_kube, TUNING), what="generation 1", on_fail=controller.log)
        spec["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
        kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))
        wait_for(lambda: len(workflows(kaito_kube, TUNING)) == 2, what="generation 2", on_fail=controller.log)
        assert sorted(w["metadata"]["name"] for w in workflows(kaito_kube, TUNING)) == [
            f"{TUNING}-tuning-1", f"{TUNING}-tuning-2"]
        spec["tuning"]["method"] = "lora"
        kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))
        cond = wait_for(lambda: (c := condition(kaito_kube, TUNING, "WorkspaceSucceeded")) and
                        c["reason"] == "ImmutableFieldChanged" and c, what="the refusal", on_fail=controller.log)
        assert "tuning.method is immutable" in cond["message"]
        assert len(workflows(kaito_kube, TUNING)) == 2


def test_a_failed_task_and_its_message_reach_the_condition(kaito_kube, kubectl, start_controller):
    controller = start_controller(kaito_kube, "--resync-s", "5")
    fail = {"fetch-dataset": (2, "error: tuning.input.urls[0]: HTTP 404 Not Found")}
    with play_argo(kaito_kube, fail=fail):
        kubectl("apply", "-f", str(EXAMPLES / "kaito_workspace_tuning_phi_3.yaml"))
        wait = kubectl("wait", "--for=jsonpath={.status.state}=Failed", f"wks/{TUNING}", "--timeout=60s",
                       check=False, timeout=90)
        assert wait.returncode == 0, controller.log()[-4000:]
    cond = condition(kaito_kube, TUNING, "WorkspaceSucceeded")
    assert cond["reason"] == "workspaceFailed"
    assert cond["message"] == "task fetch-dataset failed (exit code 2): error: tuning.input.urls[0]: HTTP 404 Not Found"
    assert kaito_kube.get(f"{WS}/{TUNING}")["status"]["pipeline"]["lastRun"]["phase"] == "Failed"


def test_sigkill_mid_reconcile_still_one_workflow(kaito_kube, kubectl, start_controller):
    first = start_controller(kaito_kube, name="first")
    time.sleep(3)  # let it start watching
    for i in range(5):
        spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
        spec["metadata"]["name"] = f"kill-{i}"
        kaito_kube.create(WS, spec)
    wait_for(lambda: workflows(kaito_kube), what="a first Workflow", on_fail=first.log)
    first.kill()
    second = start_controller(kaito_kube, name="second")
    wait_for(lambda: len(workflows(kaito_kube)) >= 5, what="all Workflows", timeout=60, on_fail=second.log)
    time.sleep(2)  # a replay or a second pass would show up now
    names = [w["metadata"]["name"] for w in workflows(kaito_kube)]
    assert sorted(names) == [f"kill-{i}-inference-1" for i in range(5)]


def test_api_server_away_for_10_s_then_recovers(kaito_kube, tmp_path, start_controller):
    proxy = ApiProxy(kaito_kube.url).start()
    kubeconfig = proxied_kubeconfig(kaito_kube, proxy, tmp_path / "proxied")
    controller = start_controller(kaito_kube, "--resync-s", "3", kubeconfig=kubeconfig)
    try:
        spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
        kaito_kube.create(WS, spec)
        wait_for(lambda: workflows(kaito_kube), what="the first Workflow", on_fail=controller.log)
        proxy.stop()
        time.sleep(2)
        spec["metadata"]["name"] = "during-outage"
        kaito_kube.create(WS, spec)  # the operator cannot see it yet
        time.sleep(8)
        assert controller.process.poll() is None, "the operator died while the API server was away"
        proxy.start()
        wait_for(lambda: workflows(kaito_kube, "during-outage"), timeout=60, what="recovery", on_fail=controller.log)
    finally:
        controller.stop()
        proxy.stop()


def test_fifty_workspaces_at_once(kaito_kube, start_controller):
    """Emulator only, for time: on the box each Workspace's Workflow is scheduled and run by Argo (tens
    of seconds of the suite's budget per ten); the real API server's figure for 500 Workspaces is
    ``python -m bench.controller_bench --api real``, a benchmark, not a test."""
    controller = start_controller(kaito_kube)
    spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    for i in range(50):
        spec["metadata"]["name"] = f"many-{i:02d}"
        kaito_kube.create(WS, spec)

    def all_reconciled():
        items = kaito_kube.list(WS)
        return sum(1 for w in items if (w.get("status") or {}).get("observedGeneration") == 1) == 50

    wait_for(all_reconciled, timeout=240, interval=2, what="50 reconciled Workspaces", on_fail=controller.log)
    names = sorted(w["metadata"]["name"] for w in workflows(kaito_kube))
    assert names == [f"many-{i:02d}-inference-1" for i in range(50)]
    for ws in kaito_kube.list(WS):
        assert ws["status"]["state"] == "Pending" and ws["status"]["targetNodeCount"] == 1


@pytest.mark.parametrize("opted_in", [False, True])
def test_opt_in_annotation(kaito_kube, start_controller, opted_in):
    """Emulator only: the filter is the operator's own (kopf's ``when=``), the API server takes no part
    in it, and showing that nothing happens to a Workspace without the annotation is a wait on any
    server."""
    controller = start_controller(kaito_kube, "--opt-in")
    spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    if opted_in:
        spec["metadata"]["annotations"] = {"kaiflow.kaito.sh/managed": "true"}
    kaito_kube.create(WS, spec)
    if opted_in:
        wait_for(lambda: workflows(kaito_kube), what="the Workflow", on_fail=controller.log)
    else:
        time.sleep(4)
        assert workflows(kaito_kube) == []
        assert "status" not in kaito_kube.get(f"{WS}/{spec['metadata']['name']}")


def _events(kube, name):
    return [e for e in kube.list("/api/v1/namespaces/default/events") if e["involvedObject"]["name"] == name]


def test_delete_never_hangs_when_release_fails(kaito_kube, kubectl, start_controller):
    """Kaito #932: a Workspace whose nodes cannot be released is still deleted, after the deadline."""
    controller = start_controller(kaito_kube, "--provider", "karpenter", "--delete-deadline-s", "4")
    spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    name = spec["metadata"]["name"]
    kaito_kube.create(WS, spec)
    wait_for(lambda: workflows(kaito_kube, name), what="the Workflow", on_fail=controller.log)
    _node_claim(kaito_kube, "stuck", name)
    kaito_kube.emulator["delete", re.compile(r".*/nodeclaims/.*")] << 500  # the cloud refuses, every time
    started = time.monotonic()
    kubectl("delete", "wks", name, "--timeout=60s", timeout=90)
    assert time.monotonic() - started < 40
    reasons = {e["reason"] for e in _events(kaito_kube, name)}
    assert {"Deleting", "ReleaseDeadlineExceeded"} <= reasons, reasons


def test_failed_tuning_frees_its_nodes(kaito_kube, kubectl, start_controller):
    """Kaito #1107: GPUs are released as soon as the Workflow fails (nothing serves from them)."""
    controller = start_controller(kaito_kube, "--provider", "karpenter")
    _node_claim(kaito_kube, "gpu-0", TUNING)
    with play_argo(kaito_kube, fail={"tune": (1, "error: CUDA out of memory")}):
        kubectl("apply", "-f", str(EXAMPLES / "kaito_workspace_tuning_phi_3.yaml"))
        wait_for(lambda: not kaito_kube.list("/apis/karpenter.sh/v1/nodeclaims"), timeout=60,
                 what="the NodeClaim released", on_fail=controller.log)
    last = wait_for(lambda: kaito_kube.get(f"{WS}/{TUNING}")["status"]["pipeline"]["lastRun"].get("nodesReleased") and
                    kaito_kube.get(f"{WS}/{TUNING}")["status"]["pipeline"]["lastRun"], what="nodesReleased")
    assert last["phase"] == "Failed" and "task tune failed (exit code 1): error: CUDA out of memory" == last["message"]
    assert "NodesReleased" in {e["reason"] for e in _events(kaito_kube, TUNING)}


def test_scheduled_workspace_shows_last_run_and_gate(kaito_kube, kubectl, start_controller):
    controller = start_controller(kaito_kube, "--provider", "karpenter")
    spec = yaml.safe_load((EXAMPLES / "scheduled_tuning_phi_3.yaml").read_text())
    name = spec["metadata"]["name"]
    cron_path = "/apis/argoproj.io/v1alpha1/namespaces/default/cronworkflows"
    with play_argo(kaito_kube, outputs={"eval-gate": {"promote": "false", "current-eval-loss": "0.4"}}) as argo:
        kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))
        (cron,) = wait_for(lambda: kaito_kube.list(cron_path), what="the CronWorkflow", on_fail=controller.log)
        run = argo.trigger(cron["metadata"]["name"])
        last = wait_for(lambda: ((kaito_kube.get(f"{WS}/{name}").get("status") or {}).get("pipeline") or {}).get("lastRun", {})
                        .get("phase") == "Succeeded" and kaito_kube.get(f"{WS}/{name}")["status"]["pipeline"]["lastRun"],
                        timeout=60, what="the run's result", on_fail=controller.log)
    assert last["name"] == run and last["promoted"] is False
    status = kaito_kube.get(f"{WS}/{name}")["status"]
    assert status["pipeline"]["kind"] == "CronWorkflow" and status["state"] == "Succeeded"
    kubectl("delete", "wks", name, "--timeout=60s", timeout=90)
    assert kaito_kube.list(cron_path) == []


def test_crash_looping_pods_turn_inference_ready_false(kaito_kube, kubectl, start_controller):
    """Kaito #931: Ready is not reported over crash-looping pods.

    Emulator only: nothing crash-loops on the box, which has no container runtime (kwok makes pods
    Running and nothing more); here the test writes the kubelet's CrashLoopBackOff status itself."""
    controller = start_controller(kaito_kube)
    spec = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    name = spec["metadata"]["name"]
    labels = {"kaito.sh/workspace": name, "app.kubernetes.io/managed-by": "kaiflow"}
    with play_argo(kaito_kube), kaito_kube.simulate_deployments():
        kaito_kube.create("/apis/apps/v1/namespaces/default/deployments", {  # what deploy-inference makes
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"kaito.sh/workspace": name}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "chat", "image": "x"}]}}}})
        kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))
        wait = kubectl("wait", "--for=condition=InferenceReady", f"wks/{name}", "--timeout=60s", check=False, timeout=90)
        assert wait.returncode == 0, controller.log()[-4000:]
    kaito_kube.create("/api/v1/namespaces/default/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-abc", "labels": labels},
        "spec": {"containers": [{"name": "chat", "image": "x"}]}})
    kaito_kube.patch(f"/api/v1/namespaces/default/pods/{name}-abc/status", {"status": {"containerStatuses": [
        {"name": "chat", "ready": False, "restartCount": 5,
         "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}}}]}})
    cond = wait_for(lambda: (c := condition(kaito_kube, name, "InferenceReady")) and c["status"] == "False" and c,
                    what="InferenceReady=False", on_fail=controller.log)
    assert cond["reason"] == "ContainerCrashLoopBackOff" and "back-off" in cond["message"]
    assert kaito_kube.get(f"{WS}/{name}")["status"]["state"] == "NotReady"


def _node_claim(kube, name: str, workspace: str, namespace: str = "default") -> None:
    """A NodeClaim as the provision step's Karpenter provider makes it: Kaito's labels and kaiflow's owner."""
    kube.create("/apis/karpenter.sh/v1/nodeclaims", {
        "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "spec": {},
        "metadata": {"name": name, "labels": {LABEL_WORKSPACE: workspace, LABEL_WORKSPACE_NAMESPACE: namespace},
                     "annotations": {ANNOTATION_OWNER: owner_annotation(namespace, workspace)}}})
