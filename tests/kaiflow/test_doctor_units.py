"""kaiflow doctor's pure parts (the checks themselves run against the cluster box: tests/cluster/test_doctor.py)."""

from __future__ import annotations

from kaiflow.doctor import Finding, argo_version, install_rights, is_gpu_node, kaito_crd_owner


def test_argo_version_from_the_image_tag():
    assert argo_version("quay.io/argoproj/workflow-controller:v3.7.9") == "v3.7.9"
    assert argo_version("myacr.azurecr.io:5000/argoproj/workflow-controller:v3.6.5") == "v3.6.5"
    assert argo_version("quay.io/argoproj/workflow-controller@sha256:abc") is None
    assert argo_version("registry:5000/workflow-controller") is None


def test_kaitos_helm_ownership_of_the_crd():
    helm = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": "kaito-workspace",
                                         "meta.helm.sh/release-namespace": "kaito-workspace"}}}
    assert kaito_crd_owner(helm) == "kaito-workspace/kaito-workspace"
    assert kaito_crd_owner({"metadata": {"annotations": {"kaiflow.kaito.sh/generated-by": "api.crd"}}}) is None


def test_gpu_nodes_are_recognised_by_label_or_sku():
    assert is_gpu_node({"metadata": {"labels": {"kubernetes.azure.com/accelerator": "nvidia"}}})
    assert is_gpu_node({"metadata": {"labels": {"node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4"}}})
    assert not is_gpu_node({"metadata": {"labels": {"node.kubernetes.io/instance-type": "Standard_D4s_v5"}}})


def test_the_rights_checked_are_the_installs_own_rbac():
    rights = install_rights("team-a")
    assert set(rights) == {("kaiflow-system", "kaiflow-controller"), ("team-a", "kaiflow-workflow"),
                           ("team-a", "kaiflow-provisioner"), ("team-a", "kaiflow-deployer")}
    assert ("kaiflow-system", "coordination.k8s.io", "leases", "update") in rights[("kaiflow-system", "kaiflow-controller")]
    assert ("team-a", "argoproj.io", "workflowtaskresults", "create") in rights[("team-a", "kaiflow-workflow")]


def test_one_line_per_finding_with_its_fix():
    assert Finding("missing", "CRD x", "kubectl apply ...").line() == "MISSING CRD x — fix: kubectl apply ..."
    assert Finding("ok", "CRD y").line() == "ok      CRD y"
