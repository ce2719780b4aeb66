"""`kaiflow doctor` against the cluster box's real API server (RBAC, CRDs, SubjectAccessReviews).

The box runs Argo's workflow-controller as a process, not a Deployment: the tests add the
Deployment object a real install has (image quay.io/argoproj/workflow-controller:v3.7.9, no replicas)
so the doctor finds it, and take it away to see it missing. Kaito is played the same way: a
Deployment named as its chart names it and a ValidatingWebhookConfiguration on kaito.sh that
matches no namespace (so it can never block the box).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cluster.conftest import ROOT, namespace_overlay

ARGO_DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "workflow-controller", "namespace": "argo"},
    "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "workflow-controller"}},
             "template": {"metadata": {"labels": {"app": "workflow-controller"}},
                          "spec": {"containers": [{"name": "workflow-controller",
                                                   "image": "quay.io/argoproj/workflow-controller:v3.7.9"}]}}},
}


def doctor(box, *args: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "doctor", "--kubeconfig", str(box.kubeconfig), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode in (0, 1), done.stderr + done.stdout
    return done.returncode, done.stdout.splitlines()


def lines_with(lines: list[str], *words: str) -> list[str]:
    return [line for line in lines if all(w in line for w in words)]


@pytest.fixture
def argo_deployment(installed):
    installed.apply(ARGO_DEPLOYMENT)
    yield
    installed.kubectl("delete", "deployment", "workflow-controller", "-n", "argo", "--ignore-not-found")


def test_an_installed_box_passes_and_every_line_names_what_it_checked(installed, argo_deployment, tenant):
    code, lines = doctor(installed, "--namespace", tenant, "--provider", "karpenter")
    assert lines_with(lines, "ok", "CRD workspaces.kaito.sh (kaiflow's)"), lines
    assert lines_with(lines, "ok", "Argo Workflows CRDs")
    assert lines_with(lines, "ok", "CRD nodeclaims.karpenter.sh")
    assert lines_with(lines, "ok", "Argo workflow-controller argo/workflow-controller v3.7.9")
    assert lines_with(lines, "warn", "no artifact repository", "fix:")
    assert lines_with(lines, "ok", "kaiflow controller kaiflow-system/kaiflow-controller")
    for account in ("kaiflow-workflow", "kaiflow-provisioner", "kaiflow-deployer"):
        assert lines_with(lines, "ok", f"ServiceAccount {tenant}/{account}: all"), (account, lines)
    assert lines_with(lines, "ok", "ServiceAccount kaiflow-system/kaiflow-controller: all")
    assert lines_with(lines, "ok", "Kaito not installed")
    # the box's storage class binds at once: the zone warning, with its fix
    assert lines_with(lines, "warn", "default StorageClass box-local: Immediate", "WaitForFirstConsumer")
    assert not lines_with(lines, "MISSING"), lines
    assert code == 0


def test_what_is_missing_is_one_line_each_with_its_fix(installed, box_namespace):
    """No Argo Deployment, a namespace without the overlay, the aks provider's settings unset."""
    code, lines = doctor(installed, "--namespace", box_namespace, "--provider", "aks")
    assert code == 1
    assert lines_with(lines, "MISSING", "Argo's workflow-controller Deployment", "fix: kubectl apply -n argo")
    for account in ("kaiflow-workflow", "kaiflow-provisioner", "kaiflow-deployer"):
        assert lines_with(lines, "MISSING", f"ServiceAccount {box_namespace}/{account}", "overlay"), lines
    assert lines_with(lines, "MISSING", "ConfigMap kaiflow-system/kaiflow-azure", "fix:")  # the operator's (docs/security.md)
    assert lines_with(lines, "MISSING", "workload identity webhook", "--enable-workload-identity")
    json_out = subprocess.run([sys.executable, "-m", "kaiflow.doctor", "--kubeconfig", str(installed.kubeconfig),
                               "-n", box_namespace, "-o", "json"], capture_output=True, text=True, cwd=ROOT,
                              timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert {f["status"] for f in json.loads(json_out.stdout)} <= {"ok", "warn", "missing"}


def test_a_right_taken_away_is_named(installed, argo_deployment, tmp_path):
    namespace = "doctor-rights"
    installed.kubectl("create", "namespace", namespace)
    try:
        installed.kubectl("apply", "-k", str(namespace_overlay(tmp_path / "overlay", namespace)))
        installed.kubectl("delete", "rolebinding", "kaiflow-deployer", "-n", namespace)
        code, lines = doctor(installed, "--namespace", namespace, "--provider", "karpenter")
        (line,) = lines_with(lines, "MISSING", f"ServiceAccount {namespace}/kaiflow-deployer may not")
        assert "patch deployments.apps in doctor-rights" in line and "fix:" in line
        assert code == 1
    finally:
        installed.kubectl("delete", "namespace", namespace, "--wait=false")
        installed.kubectl("delete", "clusterrolebinding", f"kaiflow-provisioner-{namespace}", "--ignore-not-found")


def test_gpu_nodes_without_the_device_plugin_are_named(installed, argo_deployment):
    installed.add_node("doctor-gpu-0", gpus=0, labels={"kubernetes.azure.com/accelerator": "nvidia"})
    try:
        code, lines = doctor(installed, "--provider", "karpenter")
        assert lines_with(lines, "MISSING", "GPU nodes with no allocatable nvidia.com/gpu: doctor-gpu-0",
                          "k8s-device-plugin")
        assert code == 1
    finally:
        installed.kubectl("delete", "node", "doctor-gpu-0")


def test_kaito_beside_kaiflow_is_detected(installed, argo_deployment):
    installed.kubectl("create", "namespace", "kaito-workspace", check=False)
    kaito = {**ARGO_DEPLOYMENT, "metadata": {"name": "kaito-workspace", "namespace": "kaito-workspace"},
             "spec": {**ARGO_DEPLOYMENT["spec"], "template": {
                 "metadata": {"labels": {"app": "workflow-controller"}},
                 "spec": {"containers": [{"name": "manager", "image": "mcr.microsoft.com/aks/kaito/workspace:0.6.0"}]}}}}
    webhook = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "validation.workspace.kaito.sh"},
        "webhooks": [{"name": "validation.workspace.kaito.sh", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Ignore",
                      "namespaceSelector": {"matchLabels": {"kaiflow-doctor-test": "never"}},
                      "clientConfig": {"url": "https://127.0.0.1:1/validate"},
                      "rules": [{"apiGroups": ["kaito.sh"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                                 "resources": ["workspaces"]}]}],
    }
    crd = installed.get("crd", "workspaces.kaito.sh")
    installed.apply(kaito, webhook)
    try:
        code, lines = doctor(installed, "--provider", "karpenter")
        assert lines_with(lines, "MISSING", "Kaito's controller (kaito-workspace/kaito-workspace)", "--opt-in")
        assert lines_with(lines, "warn", "Kaito's validating webhook (validation.workspace.kaito.sh)")
        assert code == 1
        # Kaito's chart owning the CRD: the doctor says so and how to take it over
        installed.kubectl("annotate", "crd", "workspaces.kaito.sh", "meta.helm.sh/release-name=kaito-workspace",
                          "meta.helm.sh/release-namespace=kaito-workspace", "kaiflow.kaito.sh/generated-by-")
        code, lines = doctor(installed, "--provider", "karpenter")
        assert lines_with(lines, "MISSING", "CRD workspaces.kaito.sh is Kaito's (Helm release "
                          "kaito-workspace/kaito-workspace)", "--skip-crds")
    finally:
        installed.kubectl("annotate", "crd", "workspaces.kaito.sh", "meta.helm.sh/release-name-",
                          "meta.helm.sh/release-namespace-", "kaiflow.kaito.sh/generated-by="
                          + crd["metadata"]["annotations"]["kaiflow.kaito.sh/generated-by"], "--overwrite", check=False)
        installed.kubectl("delete", "validatingwebhookconfiguration", "validation.workspace.kaito.sh", "--ignore-not-found")
        installed.kubectl("delete", "deployment", "kaito-workspace", "-n", "kaito-workspace", "--ignore-not-found")
