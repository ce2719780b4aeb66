"""kubectl apply of the tiny tuning Workspace → the operator's Workflow → its tasks really run.

What runs for real: the operator (a process), kubectl, the API server (emulated over HTTP), the
Workflow's steps through the local runner (fetch the demo dataset, LoRA-tune the tiny model,
push the adapter to a real registry, start the BentoML service, smoke-test it). What is played:
Argo's controller (``tests/fixtures/argo.py`` runs the manifest the operator created, with the
local runner, and writes the Workflow's status as Argo does) — there is no Argo or kubelet on
one machine, which is also why the operator renders for ``--target local`` here.

The same run on the real API server and Argo's controller, with the pods' commands run by the box's
pod runtime (tests/fixtures/pod_runtime.py), is tests/cluster/test_end_to_end.py (docs/testing.md).
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.fixtures.argo import play_argo
from tests.fixtures.kaiflow_controller import wait_for

ROOT = Path(__file__).resolve().parents[2]
WS = "/apis/kaito.sh/v1beta1/namespaces/default/workspaces"


@pytest.mark.slow
def test_tiny_tuning_from_kubectl_apply_to_adapter_and_back(kaito_kube, kubectl, start_controller, oci_registry, tmp_path):
    from steps.deploy.local_service import stop_local

    runs = tmp_path / "runs"
    base = tmp_path / "ws"
    shutil.copytree(ROOT / "examples" / "data", base / "data", ignore=shutil.ignore_patterns("*.py"))
    shutil.copytree(ROOT / "examples" / "configs", base / "configs")
    spec = yaml.safe_load((ROOT / "examples" / "local_tuning_tiny.yaml").read_text())
    image = f"{oci_registry.host}/kaiflow/e2e-adapter:v1"
    spec["tuning"]["output"]["image"] = image
    name = spec["metadata"]["name"]
    controller = start_controller(kaito_kube, "--target", "local", "--local-root", str(runs),
                                  "--local-base-dir", str(base), "--resync-s", "10")
    workflow = f"{name}-tuning-1"
    try:
        with play_argo(kaito_kube, mode="local", local_root=runs) as argo:
            kubectl("apply", "-f", "-", input=yaml.safe_dump(spec))

            def succeeded() -> bool:
                if argo.errors:  # a player that failed to run the Workflow would leave us waiting
                    raise argo.errors[0]
                return kubectl("wait", "--for=condition=WorkspaceSucceeded", f"wks/{name}", "--timeout=5s",
                               check=False, timeout=30).returncode == 0

            wait_for(succeeded, timeout=900, interval=1, what="WorkspaceSucceeded",
                     on_fail=lambda: f"{controller.log()[-4000:]}\n{kaito_kube.get(f'{WS}/{name}').get('status')}")
    finally:
        stop_local(runs / "default" / workflow / "serve")

    status = kaito_kube.get(f"{WS}/{name}")["status"]
    assert status["state"] == "Succeeded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {t: conditions[t]["status"] for t in ("ResourceReady", "JobStarted", "InferenceReady", "WorkspaceSucceeded")} \
        == dict.fromkeys(("ResourceReady", "JobStarted", "InferenceReady", "WorkspaceSucceeded"), "True")
    # True in the order the DAG reaches them (Events are numbered by the API server; the operator
    # posts each just after the status patch it reports, so the last may follow the condition).
    def true_events():
        found = [e for e in kaito_kube.list("/api/v1/namespaces/default/events")
                 if e["involvedObject"]["name"] == name and "=True" in e["message"]]
        return found if any(e["message"].startswith("WorkspaceSucceeded=") for e in found) else None

    events = sorted(wait_for(true_events, what="the WorkspaceSucceeded=True Event"),
                    key=lambda e: int(e["metadata"]["resourceVersion"]))
    order = [e["message"].split("=")[0] for e in events]
    assert [t for t in order if t in ("ResourceReady", "JobStarted", "InferenceReady", "WorkspaceSucceeded")] == \
        ["ResourceReady", "JobStarted", "InferenceReady", "WorkspaceSucceeded"], order
    # The adapter is in the registry with the digest the run reported.
    assert status["pipeline"]["lastRun"]["adapterImage"].startswith(f"{oci_registry.host}/kaiflow/e2e-adapter")
    request = urllib.request.Request(f"http://{oci_registry.host}/v2/kaiflow/e2e-adapter/manifests/v1",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"].startswith("sha256:")

    kubectl("delete", "wks", name, "--timeout=60s", timeout=90)
    assert kaito_kube.list(WS) == []
    assert kaito_kube.list("/apis/argoproj.io/v1alpha1/namespaces/default/workflows") == []
