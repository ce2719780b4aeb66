"""Nodes and tenancy on the cluster box's real API server (issue 17, Medium 5; docs/security.md).

A tenant who may create pods (and Workflows) in a Workspace namespace can run a pod as any
ServiceAccount of that namespace, so every right of those accounts is the tenant's. None of them
may create, change or delete a NodeClaim: the operator (kaiflow-system) requests and releases the
Workspace's nodes; the provision-nodes task only waits for them.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.test_install import request_as

TENANT = "alice"
CLAIM = {
    "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
    "metadata": {"name": "tenantmade0"},
    "spec": {"nodeClassRef": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"},
             "requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In",
                               "values": ["Standard_NC96ads_A100_v4"]}]},
}


def tenant_who_makes_pods(box, namespace: str) -> None:
    """``alice`` may create pods and Argo Workflows in the namespace, nothing else."""
    box.apply(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "pod-maker", "namespace": namespace},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "delete"]},
                   {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["create", "get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "pod-maker", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-maker"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}]},
    )


def test_a_tenant_who_can_create_pods_cannot_create_or_delete_a_nodeclaim(installed, tenant, fake_karpenter):
    tenant_who_makes_pods(installed, tenant)
    # The tenant can indeed run a pod as each of the namespace's accounts ...
    accounts = sorted(sa["metadata"]["name"] for sa in installed.list("serviceaccounts", namespace=tenant))
    assert {"kaiflow-provisioner", "kaiflow-workflow", "kaiflow-deployer"} <= set(accounts)
    assert installed.kubectl("auth", "can-i", "create", "pods", namespace=tenant, as_user=TENANT,
                             check=False).stdout.strip() == "yes"
    # ... and a Workspace of the namespace has a claim the operator made.
    operator = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    [claim] = request_as(operator, "--provider", "karpenter", "--workspace-name", "ws-tenant", "--namespace", tenant,
                         "--instance-type", "Standard_NC24ads_A100_v4")
    owner = installed.get("nodeclaims.karpenter.sh", claim)["metadata"]["annotations"]["kaiflow.kaito.sh/owner"]
    assert owner == f"kaito.sh/Workspace/{tenant}/ws-tenant"

    for who in [TENANT, *(f"system:serviceaccount:{tenant}:{sa}" for sa in accounts)]:
        for verb in ("create", "delete", "patch", "update", "deletecollection"):
            answer = installed.kubectl("auth", "can-i", verb, "nodeclaims.karpenter.sh", as_user=who, check=False)
            assert answer.stdout.strip() == "no", f"{who} may {verb} NodeClaims"
        created = installed.kubectl("create", "-f", "-", input=json.dumps(CLAIM), as_user=who, check=False)
        assert created.returncode != 0 and "Forbidden" in created.stderr, (who, created.stdout)
        deleted = installed.kubectl("delete", "nodeclaim", claim, "--wait=false", as_user=who, check=False)
        assert deleted.returncode != 0 and "Forbidden" in deleted.stderr, (who, deleted.stdout)
        relabelled = installed.kubectl("label", "nodeclaim", claim, "kaito.sh/workspace=stolen", "--overwrite",
                                       as_user=who, check=False)
        assert relabelled.returncode != 0 and "Forbidden" in relabelled.stderr, (who, relabelled.stdout)
    assert installed.get("nodeclaims.karpenter.sh", "tenantmade0") is None
    assert installed.get("nodeclaims.karpenter.sh", claim)["metadata"]["labels"]["kaito.sh/workspace"] == "ws-tenant"
    installed.kubectl("delete", "nodeclaim", claim, "--wait=false", kubeconfig=operator)


@pytest.mark.parametrize("account", ["kaiflow-provisioner", "kaiflow-workflow", "kaiflow-deployer"])
def test_no_tenant_account_carries_an_azure_identity(installed, tenant, account):
    """On AKS the identity that may write agent pools is the operator's (kaiflow-system), never a
    tenant namespace's: no workload-identity client id on any account there."""
    sa = installed.get("serviceaccount", account, tenant)
    assert "azure.workload.identity/client-id" not in (sa["metadata"].get("annotations") or {})
    operator = installed.get("serviceaccount", "kaiflow-controller", "kaiflow-system")
    assert "azure.workload.identity/client-id" in operator["metadata"]["annotations"]
