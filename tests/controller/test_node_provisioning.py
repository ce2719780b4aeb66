"""The operator creates and releases a Workspace's nodes, with the shipped install's settings
(issue 17: High 3, Medium 5; docs/security.md, "Nodes and tenancy").

End to end against the local ARM server (``tests/fixtures/azure_arm.py``) and the emulated API
server: the operator's environment is built from the install exactly as the kubelet would build
it (the Deployment's env, resolved from the kaiflow-azure ConfigMap in kaiflow-system, which the
admin fills in — here with the ARM server's cluster); the workload-identity webhook's part (the
token) is played by the ARM server's managed-identity endpoint.

Kept on the emulator: the API server only hands the operator a created Workspace (the operator's
calls are made in-process); what is tested is the ARM traffic, simulated on any API server. The
operator's NodeClaims (Karpenter) on the real API server are in tests/cluster/ (test_install.py,
test_deadline.py, test_controller_port.py).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from controller.decide import Desired, decide
from controller.nodes import provision_args
from controller.operator import Operator
from controller.options import ControllerOptions
from steps.provision.base import pool_safe_name

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WORKSPACES = "/apis/kaito.sh/v1beta1/namespaces/team-a/workspaces"


def install() -> dict[tuple[str, str], dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / "controller" / "manifests")],
                              capture_output=True, text=True, check=True).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}


def operator_env(objects: dict, config_map_data: dict[str, str]) -> dict[str, str]:
    """The controller container's environment, resolved as the kubelet does (configMapKeyRef)."""
    deployment = objects[("Deployment", "kaiflow-controller")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        if "configMapKeyRef" not in var["valueFrom"]:
            continue  # the pod's own name and namespace (fieldRef): not Azure's
        ref = var["valueFrom"]["configMapKeyRef"]
        config_map = objects[("ConfigMap", ref["name"])]
        assert config_map["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        env[var["name"]] = config_map_data[ref["key"]]
    return env


def test_the_shipped_install_gives_the_operator_the_azure_settings_and_identity():
    objects = install()
    deployment = objects[("Deployment", "kaiflow-controller")]
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = objects[("ServiceAccount", template["spec"]["serviceAccountName"])]
    assert account["metadata"]["namespace"] == "kaiflow-system"
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    config_map = objects[("ConfigMap", "kaiflow-azure")]
    env = operator_env(objects, config_map["data"])
    assert env["KAIFLOW_CONTROLLER_PROVIDER"] == "aks"
    assert {k: env[k] for k in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_CLUSTER_NAME")} == {
        "AZURE_SUBSCRIPTION_ID": config_map["data"]["subscriptionId"],
        "AZURE_RESOURCE_GROUP": config_map["data"]["resourceGroup"],
        "AZURE_CLUSTER_NAME": config_map["data"]["clusterName"]}
    # The tenant-namespace accounts carry no Azure identity (Medium 5).
    provisioner = objects[("ServiceAccount", "kaiflow-provisioner")]
    assert "azure.workload.identity/client-id" not in (provisioner["metadata"].get("annotations") or {})


def test_the_operator_requests_and_releases_an_aks_pool_with_the_installs_settings(kube, azure_arm, monkeypatch):
    objects = install()
    for name, value in operator_env(objects, {"subscriptionId": azure_arm.subscription_id,
                                              "resourceGroup": azure_arm.resource_group,
                                              "clusterName": azure_arm.cluster_name}).items():
        monkeypatch.setenv(name, value)
    azure_arm.apply_env(monkeypatch)  # the identity endpoint stands in for workload identity's token
    monkeypatch.setenv("AZURE_RESOURCE_MANAGER_ENDPOINT", azure_arm.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(azure_arm.ca_bundle))
    azure_arm.polls_until_done = 1

    body = yaml.safe_load((EXAMPLES / "kaito_workspace_phi_3.yaml").read_text())
    body["apiVersion"] = "kaito.sh/v1beta1"
    body["metadata"] = {"name": "phi-3", "namespace": "team-a"}
    created = kube.create(WORKSPACES, body)
    options = ControllerOptions(kubeconfig=str(kube.kubeconfig), provider=None)  # the Deployment's env: aks
    operator = Operator(options)
    desired = decide(copy.deepcopy(created), options)
    assert isinstance(desired, Desired)
    args = provision_args(desired.manifest)
    assert args is not None and "--wait-only" in args and args[args.index("--provider") + 1] == "aks"

    pool = pool_safe_name("phi-3", "team-a")
    assert operator.request_nodes(desired) == [pool]
    assert azure_arm.pools[pool]["properties"]["tags"] == {"kaiflow.kaito.sh_owner": "kaito.sh/Workspace/team-a/phi-3"}
    assert operator.request_nodes(desired) == [pool]  # idempotent: no second PUT for the same pool
    assert [m for m, _, _ in azure_arm.requests].count("PUT") == 1

    deleting = copy.deepcopy(created)
    deleting["metadata"]["deletionTimestamp"] = "2099-01-01T00:00:00Z"
    deleting["status"] = {"pipeline": {"provider": "aks"}}
    operator.finalize(deleting)
    assert azure_arm.pools == {}, "kubectl delete wks releases the GPU pool in the shipped install"
    assert ("DELETE", azure_arm.pool_path(pool), True) in azure_arm.requests


@pytest.mark.parametrize("example", ["kaito_workspace_phi_3.yaml", "kaito_workspace_tuning_phi_3.yaml"])
def test_the_controllers_workflows_only_wait_for_the_nodes(example):
    """The provision-nodes task of a Workflow the operator renders creates nothing (--wait-only)
    and runs without an Azure identity; the DAG's task names stay."""
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body["metadata"] = {**body["metadata"], "namespace": "team-a", "uid": "0f0f", "generation": 1}
    desired = decide(body, ControllerOptions(provider="aks"))
    templates = {t["name"]: t for t in desired.manifest["spec"]["templates"]}
    tasks = {task["name"]: task["template"] for t in templates.values() for task in (t.get("dag") or {}).get("tasks", [])}
    provision = templates[tasks["provision-nodes"]]
    assert "--wait-only" in provision["container"]["args"]
    assert not (provision.get("metadata") or {}).get("labels", {}).get("azure.workload.identity/use")
    assert not any(e["name"].startswith("AZURE_") for e in provision["container"].get("env") or [])
    assert provision_args(desired.manifest) == provision["container"]["args"]
