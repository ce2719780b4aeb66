"""The install (``kubectl apply -k controller/manifests``), rendered by kubectl's own kustomize.

Every ServiceAccount, ConfigMap and Secret a rendered example Workflow refers to must exist in
the install or be the user's (named in the Workspace); the controller's RBAC covers what it does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from api import load_workspace
from api.crd import workspace_crd
from pipelines import manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def install() -> list[dict]:
    out = subprocess.run(["/usr/bin/kubectl", "kustomize", str(ROOT / "controller" / "manifests")],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(install, kind, name=None, namespace=None):
    return [o for o in install if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def references(node, found=None):
    """(kind, name) of every ServiceAccount, ConfigMap and Secret a manifest refers to."""
    found = set() if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "serviceAccountName":
                found.add(("ServiceAccount", value))
            elif key in ("configMapKeyRef", "configMap", "configMapRef"):
                found.add(("ConfigMap", value["name"]))
            elif key in ("secretKeyRef", "secretRef"):
                found.add(("Secret", value["name"]))
            elif key == "secret" and "secretName" in value:
                found.add(("Secret", value["secretName"]))
            references(value, found)
    elif isinstance(node, list):
        for item in node:
            references(item, found)
    return found


def users_own(workspace) -> set[tuple[str, str]]:
    """What the Workspace itself names: the user creates these."""
    own = set()
    spec = workspace.tuning or workspace.inference
    if workspace.tuning:
        if workspace.tuning.output.image_push_secret:
            own.add(("Secret", workspace.tuning.output.image_push_secret))
        if workspace.tuning.config:
            own.add(("ConfigMap", workspace.tuning.config))
    options = getattr(spec.preset, "preset_options", None) if spec.preset else None
    if options and options.model_access_secret:
        own.add(("Secret", options.model_access_secret))
    for adapter in getattr(spec, "adapters", None) or []:
        own |= {("Secret", s) for s in adapter.source.image_pull_secrets or []}
    return own


# A hand-submitted Workflow (`kaiflow render | argo submit`, no Workspace uid) creates and releases
# its nodes itself; on AKS that needs what the install keeps out of tenant namespaces (the Azure
# settings and an identity: docs/security.md, "Nodes and tenancy"), which an admin adds there.
ADMINS_FOR_HAND_SUBMITTED = {("ConfigMap", "kaiflow-azure")}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
@pytest.mark.parametrize("by", ["controller", "hand"])
def test_every_reference_of_a_rendered_workflow_is_installed_or_the_users(install, example, by):
    workspace = load_workspace(example)
    if by == "controller":
        workspace.metadata.uid = "0f0f-uid"  # what the operator renders: the nodes are its to make
    rendered = manifest(workspace)
    namespace = rendered["metadata"]["namespace"]
    refs = references(rendered)
    assert ("ServiceAccount", "kaiflow-workflow") in refs
    admins = ADMINS_FOR_HAND_SUBMITTED if by == "hand" else set()
    missing = [ref for ref in sorted(refs - users_own(workspace) - admins) if not find(install, ref[0], ref[1], namespace)]
    assert not missing, f"{example.name}: not in the install (namespace {namespace}) nor the user's: {missing}"


def test_every_workflow_identity_can_report_to_argo(install):
    (binding,) = find(install, "RoleBinding", "kaiflow-argo-executor", "default")
    (role,) = find(install, "Role", "kaiflow-argo-executor", "default")
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]
    assert {s["name"] for s in binding["subjects"]} == {"kaiflow-workflow", "kaiflow-provisioner", "kaiflow-deployer"}


def test_controller_rbac_is_what_it_does_and_no_more(install):
    (role,) = find(install, "ClusterRole", "kaiflow-controller")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    for need in [("kaito.sh", "workspaces", "watch"), ("kaito.sh", "workspaces/status", "patch"),
                 ("argoproj.io", "workflows", "create"), ("argoproj.io", "workflows", "patch"),
                 ("argoproj.io", "cronworkflows", "delete"), ("", "events", "create"), ("", "pods", "list"),
                 ("karpenter.sh", "nodeclaims", "delete")]:
        assert need in allowed, need
    assert not any("*" in (g, r, v) for g, r, v in allowed)
    assert not any(r == "configmaps" for _, r, _ in allowed)
    # signed dataset URLs: a new Secret per run; the controller reads no Secret
    assert {v for _, r, v in allowed if r == "secrets"} == {"create"}, "the controller reads no secrets"


def test_controller_deployment_is_hardened(install):
    (deployment,) = find(install, "Deployment", "kaiflow-controller", "kaiflow-system")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == "kaiflow-controller" and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"requests", "limits"} <= container["resources"].keys()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["command"] == ["python", "-m", "controller"]  # the slim controller image (Dockerfile)
    assert any(a.startswith("--liveness-port=8080") for a in container["args"])
    (images,) = [c for c in find(install, "ConfigMap") if c["metadata"]["name"].startswith("kaiflow-images")]
    assert container["envFrom"][0]["configMapRef"]["name"] == images["metadata"]["name"]
    assert {"KAIFLOW_PIPELINE_IMAGE", "KAIFLOW_SERVING_IMAGE"} <= images["data"].keys()


def test_the_crd_is_applied_on_its_own_so_uninstalling_keeps_every_workspace(install):
    """`kubectl delete -k controller/manifests` must not delete the CRD (and with it every Workspace)."""
    assert not find(install, "CustomResourceDefinition")
    crd = yaml.safe_load((ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml").read_text())
    expected = workspace_crd()
    assert crd["spec"]["versions"] == expected["spec"]["versions"]
    assert crd["spec"]["names"]["shortNames"] == ["wk", "wks"]
