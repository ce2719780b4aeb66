"""Issue 11, rendered Workflows: step pods as the image's non-root user, tokens only where needed,
bounded emptyDirs, placeholders Argo can resolve and valid names for any Secret name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines import Images, Target
from pipelines.names import dns1123_label, is_dns1123_label
from pipelines.structure import problems, workflow_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TEMPLATES = sorted((ROOT / "workflow_templates").glob("*.yaml"))
# the steps that call the Kubernetes API (provision: NodeClaims, nodes; deploy: Deployment, Service)
API_STEPS = {"steps.provision", "steps.deploy"}


def _cluster() -> Target:
    return Target.cluster(images=Images(), provider="aks", insecure_registries=())


def _manifests():
    for example in EXAMPLES:
        yield example.name, pipelines.manifest(example, _cluster())
    for path in TEMPLATES:
        yield path.name, yaml.safe_load(path.read_text())


def _pods(manifest: dict):
    return [t for t in workflow_spec(manifest)["templates"] if "container" in t]


@pytest.mark.parametrize("name,manifest", list(_manifests()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_step_pod_runs_as_the_image_user_with_fs_group(name: str, manifest: dict):
    pods = _pods(manifest)
    assert pods
    for template in pods:
        pod = template["securityContext"]
        assert (pod["runAsNonRoot"], pod["runAsUser"], pod["fsGroup"]) == (True, 1000, 1000), template["name"]
        assert template["container"]["securityContext"]["allowPrivilegeEscalation"] is False
        module = template["container"]["command"][2]
        if module in API_STEPS:
            assert "automountServiceAccountToken" not in template, template["name"]
            assert template.get("serviceAccountName"), template["name"]
        else:
            assert template["automountServiceAccountToken"] is False, template["name"]
            # Argo's executor still needs a token of its own when the pod has none
            assert template["executor"]["serviceAccountName"] == "kaiflow-workflow"
        for volume in template.get("volumes") or []:
            if "emptyDir" in volume:
                assert volume["emptyDir"]["sizeLimit"]


def test_pod_uid_follows_the_install_image(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KAIFLOW_PIPELINE_UID", "4242")
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml", Target.cluster())
    assert {t["securityContext"]["fsGroup"] for t in _pods(manifest)} == {4242}


def test_local_runs_get_no_kubernetes_fields(tmp_path: Path):
    target = Target.local(tmp_path, base_dir=ROOT / "examples", port=3000)
    manifest = pipelines.manifest(ROOT / "examples" / "local_tuning_tiny.yaml", target)
    for template in _pods(manifest):
        assert not {"securityContext", "automountServiceAccountToken", "executor", "volumes"} & set(template)


def test_uppercase_placeholder_in_an_annotation_is_refused():
    manifest = yaml.safe_load((ROOT / "workflow_templates" / "kaiflow-tune.yaml").read_text())
    assert problems(manifest) == []
    tune = next(t for t in manifest["spec"]["templates"] if t["name"] == "tune")
    # what `.upper()` on a placeholder produced: Argo's variables are case-sensitive
    tune["metadata"]["annotations"]["workflows.argoproj.io/description"] = "{{INPUTS.PARAMETERS.METHOD}} tuning"
    assert any("unknown reference {{INPUTS.PARAMETERS.METHOD}}" in p for p in problems(manifest))


@pytest.mark.parametrize("where", ["workflow-metadata", "pod-label", "env"])
def test_placeholders_are_checked_everywhere(where: str):
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml", _cluster())
    broken = copy.deepcopy(manifest)
    tune = next(t for t in workflow_spec(broken)["templates"] if t["name"] == "tune")
    if where == "workflow-metadata":
        # spec.workflowMetadata is evaluated by Argo (the object's own annotations are not: they
        # hold bookkeeping such as the controller's JSON); no inputs exist at workflow level
        workflow_spec(broken)["workflowMetadata"] = {"annotations": {"x": "{{inputs.parameters.method}}"}}
    elif where == "pod-label":
        workflow_spec(broken)["podMetadata"]["labels"]["x"] = "{{workflow.parameters.nope}}"
    else:
        tune["container"]["env"].append({"name": "X", "value": "{{inputs.parameters.methd}}"})
    assert problems(manifest) == []
    assert problems(broken), where


def test_unbalanced_braces_are_reported():
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml", _cluster())
    tune = next(t for t in workflow_spec(manifest)["templates"] if t["name"] == "tune")
    tune["container"]["args"].append("{{inputs.parameters.method")
    assert any("unbalanced braces" in p for p in problems(manifest))


@pytest.mark.parametrize("text", ["acr.push", "ACR_REGISTRY_SECRET_HERE", "a" * 80, "docker-config-ok", "...", "x.y-"])
def test_dns1123_label_is_valid_and_stable(text: str):
    label = dns1123_label(text)
    assert is_dns1123_label(label)
    assert dns1123_label(text) == label
    if is_dns1123_label(text):
        assert label == text


def test_distinct_secret_names_do_not_collide():
    assert dns1123_label("acr.push") != dns1123_label("acr-push")
    assert dns1123_label("acr.push").startswith("acr-push-")


def test_secret_with_a_dot_yields_a_valid_volume_name(tmp_path: Path):
    workspace = yaml.safe_load((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text())
    workspace["tuning"]["output"]["imagePushSecret"] = "acr.push"
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(workspace))
    manifest = pipelines.manifest(path, _cluster())
    assert problems(manifest) == []
    spec = workflow_spec(manifest)
    secret_volume = next(v for v in spec["volumes"] if "secret" in v)
    assert secret_volume["secret"]["secretName"] == "acr.push"
    assert is_dns1123_label(secret_volume["name"]) and secret_volume["name"].startswith("docker-config-acr-push-")
    mounts = {m["name"] for t in _pods(manifest) for m in t["container"].get("volumeMounts") or []}
    assert secret_volume["name"] in mounts


def test_structure_refuses_an_invalid_volume_name():
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml", _cluster())
    spec = workflow_spec(manifest)
    old = spec["volumes"][0]["name"]
    spec["volumes"][0]["name"] = "docker-config-acr.push"
    for template in _pods(manifest):
        for mount in template["container"].get("volumeMounts") or []:
            if mount["name"] == old:
                mount["name"] = "docker-config-acr.push"
    found = problems(manifest)
    assert any("'docker-config-acr.push' is not a valid volume name" in p for p in found)


def test_structure_refuses_an_unbounded_empty_dir():
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml", _cluster())
    tune = next(t for t in workflow_spec(manifest)["templates"] if t["name"] == "tune")
    tune["volumes"][0]["emptyDir"] = {}
    assert any("has no sizeLimit" in p for p in problems(manifest))
