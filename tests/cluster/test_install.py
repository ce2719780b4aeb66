"""The install (``kubectl apply -k controller/manifests``) on a real API server, and what each of its
ServiceAccounts may do: exactly the kept list (least privilege), and enough for what each one
really calls — the provision step, the deploy step and Argo's executor run as those accounts here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import ROOT, namespace_overlay, run_step
from tests.fixtures.cluster import GPU_TAINT

RIGHTS = Path(__file__).with_name("rights.yaml")
WORKFLOW_NAMESPACE = "default"
ACCOUNTS = {  # (namespace, ServiceAccount) -> the key in rights.yaml
    ("kaiflow-system", "kaiflow-controller"): "kaiflow-controller",
    (WORKFLOW_NAMESPACE, "kaiflow-workflow"): "kaiflow-workflow",
    (WORKFLOW_NAMESPACE, "kaiflow-provisioner"): "kaiflow-provisioner",
    (WORKFLOW_NAMESPACE, "kaiflow-deployer"): "kaiflow-deployer",
}


CAN_I_ROW = re.compile(r"^(\S*)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$")


def rights(box, namespace: str, account: str, *, in_namespace: str) -> list[str]:
    """``kubectl auth can-i --list`` as the account: one "resource[/names]: verbs" line a row, sorted.

    Rows every authenticated user has (non-resource URLs, self-subject reviews) are left out.
    """
    out = box.kubectl("auth", "can-i", "--list", "--no-headers", f"--namespace={in_namespace}",
                      as_user=f"system:serviceaccount:{namespace}:{account}").stdout
    lines = []
    for row in out.splitlines():
        match = CAN_I_ROW.match(row)
        assert match, f"unexpected can-i row: {row!r}"
        resource, _urls, names, verbs = match.groups()
        if not resource or resource.startswith("selfsubject"):
            continue
        lines.append(f"{resource}{'/' + names if names else ''}: {' '.join(sorted(verbs.split()))}")
    return sorted(lines)


def test_the_install_applies_and_kubectl_shows_workspaces_with_the_servers_columns(installed):
    out = installed.kubectl("get", "workspaces", "-A").stdout
    assert out == "" or "NAME" in out  # an empty list prints nothing on stdout
    crd = installed.get("crd", "workspaces.kaito.sh")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])


@pytest.mark.parametrize("account", sorted(ACCOUNTS), ids=[a for _, a in sorted(ACCOUNTS)])
def test_each_service_account_may_do_exactly_the_kept_list(installed, account):
    namespace, name = account
    kept = yaml.safe_load(RIGHTS.read_text())[ACCOUNTS[account]]
    found = {ns: rights(installed, namespace, name, in_namespace=ns) for ns in sorted(kept)}
    assert found == {ns: sorted(kept[ns]) for ns in kept}, yaml.safe_dump(found)


def request_as(kubeconfig, *argv: str) -> list[str]:
    """``steps.provision.release.request`` (what the operator does before it creates a Workflow) as an account."""
    done = subprocess.run([sys.executable, "-c", "import json, sys; from steps.provision.release import request; "
                           "print(json.dumps(request(sys.argv[1:])))", *argv], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_operator_claims_the_provisioner_waits_and_the_operator_releases(installed, fake_karpenter, tmp_path):
    """The split of issue 17 (Medium 5): the controller's account creates the NodeClaims, the
    provision step as the tenant namespace's provisioner only waits (--wait-only), the controller's
    account releases them."""
    operator = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    provisioner = installed.service_account_kubeconfig("kaiflow-provisioner", WORKFLOW_NAMESPACE)
    common = ["--provider", "karpenter", "--workspace-name", "ws-rbac", "--namespace", WORKFLOW_NAMESPACE]
    sized = [*common, "--instance-type", "Standard_NC24ads_A100_v4", "--count", "1"]
    assert len(request_as(operator, *sized)) == 1
    assert request_as(operator, *sized) == request_as(operator, *sized)  # re-applied, not duplicated
    made = run_step("steps.provision", *sized, "--wait-only", "--outputs", str(tmp_path / "out"), kubeconfig=provisioner)
    assert made.returncode == 0, made.stderr
    nodes = json.loads((tmp_path / "out" / "nodes").read_text())
    assert len(nodes) == 1 and installed.get("node", nodes[0]) is not None
    refused = run_step("steps.provision", *sized, "--outputs", str(tmp_path / "self"), kubeconfig=provisioner)
    assert refused.returncode == 2 and "403" in refused.stderr, "the tenant's provisioner may not create claims itself"
    released = run_step("steps.provision", "--delete", *common, "--outputs", str(tmp_path / "rel"), kubeconfig=operator)
    assert released.returncode == 0, released.stderr
    assert installed.list("nodeclaims.karpenter.sh", selector="kaito.sh/workspace=ws-rbac") == []


def test_the_deploy_step_as_the_deployer_account_rolls_out_the_service(installed, tmp_path):
    installed.add_node("deploy-gpu-node", gpus=1, labels={"apps": "deploy-test"}, taints=[GPU_TAINT])
    kubeconfig = installed.service_account_kubeconfig("kaiflow-deployer", WORKFLOW_NAMESPACE)
    done = run_step("steps.deploy", "--mode", "cluster", "--workspace-name", "ws-deploy", "--preset", "phi-3-mini-4k-instruct",
                    "--image", "ghcr.io/kaiflow/kaiflow-chat:0.1.0", "--namespace", WORKFLOW_NAMESPACE, "--gpus", "1",
                    "--node-label", "apps=deploy-test", "--ready-timeout", "120", "--outputs", str(tmp_path / "out"),
                    kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "service-url").read_text().startswith("http://")
    deployment = installed.get("deployment", "ws-deploy", WORKFLOW_NAMESPACE)
    assert deployment["status"].get("availableReplicas") == 1


def test_two_namespace_overlays_both_provision(installed, fake_karpenter, tmp_path):
    for namespace in ("team-a", "team-b"):
        installed.kubectl("create", "namespace", namespace)
        installed.kubectl("apply", "-k", str(namespace_overlay(tmp_path / namespace, namespace)))
    operator = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    for namespace in ("team-a", "team-b"):
        kubeconfig = installed.service_account_kubeconfig("kaiflow-provisioner", namespace)
        common = ["--provider", "karpenter", "--workspace-name", "ws", "--namespace", namespace]
        request_as(operator, *common, "--instance-type", "Standard_NC24ads_A100_v4")
        made = run_step("steps.provision", *common, "--instance-type", "Standard_NC24ads_A100_v4", "--wait-only",
                        "--outputs", str(tmp_path / f"out-{namespace}"), kubeconfig=kubeconfig)
        assert made.returncode == 0, made.stderr
        released = run_step("steps.provision", "--delete", *common, "--outputs", str(tmp_path / f"rel-{namespace}"),
                            kubeconfig=operator)
        assert released.returncode == 0, released.stderr
    bindings = {b["metadata"]["name"]: b["subjects"] for b in installed.list("clusterrolebindings")
                if b["roleRef"]["name"] == "kaiflow-provisioner"}
    assert bindings == {f"kaiflow-provisioner-{ns}": [{"kind": "ServiceAccount", "name": "kaiflow-provisioner", "namespace": ns}]
                        for ns in ("default", "team-a", "team-b")}
