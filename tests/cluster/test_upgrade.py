"""Upgrade and uninstall on the box's real API server (docs/install.md, 'Upgrade' and 'Uninstall').

Upgrade: the CRD re-applied, the install re-applied with new images, the operator replaced (as the
Deployment's rollout does): every Workspace stays, its running Workflow is the same object (same
uid, still running) and no second one is made. Uninstall: what `kubectl delete -k
controller/manifests` deletes, asked of the server with --dry-run=server (the box is shared by the
session): never the CRD, so never a Workspace; deleting the CRD is its own explicit command.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
from pathlib import Path

import yaml

from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "controller" / "manifests"
CRD = MANIFESTS / "kaito.sh_workspaces.yaml"


def _set_images():
    spec = importlib.util.spec_from_file_location("kaiflow_set_images", ROOT / "tools" / "images" / "set_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.set_images


def _workspace(namespace: str, name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text()) if d]
    ws = next(d for d in docs if d["kind"] == "Workspace")
    ws["metadata"].update(namespace=namespace, name=name)
    return ws


def _workflows(box, namespace: str) -> list[dict]:
    return box.list("workflows.argoproj.io", namespace=namespace)


def test_an_upgrade_keeps_every_workspace_and_its_running_workflow(installed, tenant, start_controller, argo_agent,
                                                                   tmp_path):
    box = installed
    kubeconfig = box.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    args = ("--resync-s", "2", "--provider", "karpenter", "--namespace", tenant, "--verbose")
    old = start_controller(None, *args, kubeconfig=kubeconfig, name="before-upgrade")
    hold = threading.Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"}), hold=hold)
    upgraded = tmp_path / "manifests"
    try:
        box.apply(_workspace(tenant, "upgrade-a"))
        (before,) = wait_until(lambda: _workflows(box, tenant), timeout=60, what="the Workflow", detail=old.log)
        wait_until(lambda: (box.get("workflow", before["metadata"]["name"], tenant).get("status") or {})
                   .get("phase") == "Running", timeout=60, what="the Workflow running")

        # the upgrade, as docs/install.md gives it
        shutil.copytree(MANIFESTS, upgraded)
        kustomization = upgraded / "kustomization.yaml"
        kustomization.write_text(_set_images()(kustomization.read_text(), "registry.example/kaiflow", "0.2.0"))
        box.kubectl("apply", "--server-side", "-f", str(CRD))
        box.kubectl("apply", "-k", str(upgraded))
        deployment = box.get("deployment", "kaiflow-controller", "kaiflow-system")
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
            "registry.example/kaiflow/kaiflow-controller:0.2.0"
        old.stop()
        new = start_controller(None, *args, kubeconfig=kubeconfig, name="after-upgrade")
        new.wait_resyncs(tenant, "upgrade-a")  # the new operator started and looked at the Workspace again
        assert new.process.poll() is None, new.log()

        assert box.get("workspace.kaito.sh", "upgrade-a", tenant) is not None
        (after,) = _workflows(box, tenant)
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["status"]["phase"] == "Running"
    finally:
        hold.set()
        box.kubectl("apply", "-k", str(MANIFESTS))  # the session's install as it was


def test_uninstall_deletes_neither_the_crd_nor_any_workspace(installed, tenant):
    box = installed
    box.apply(_workspace(tenant, "kept"))
    planned = box.kubectl("delete", "-k", str(MANIFESTS), "--dry-run=server", "-o", "name").stdout.split()
    assert "namespace/kaiflow-system" in planned and "deployment.apps/kaiflow-controller" in planned
    assert not [p for p in planned if p.startswith("customresourcedefinition") or "workspace" in p.split("/")[0]]
    assert box.get("workspace.kaito.sh", "kept", tenant) is not None
    # removing the CRD (and with it every Workspace) is a separate, explicit command
    explicit = box.kubectl("delete", "-f", str(CRD), "--dry-run=server", "-o", "name").stdout.split()
    assert explicit == ["customresourcedefinition.apiextensions.k8s.io/workspaces.kaito.sh"]
