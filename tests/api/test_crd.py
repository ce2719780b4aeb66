"""The CRD is generated from the model, structural, and the checked-in copy does not drift."""

from pathlib import Path

import yaml

import pytest

from api.crd import IMMUTABLE_FIELDS, PRINTER_COLUMNS, crd_yaml, immutable_changes, immutable_values, workspace_crd

ROOT = Path(__file__).resolve().parents[2]
# CI has Kaito's reference files beside the clone (shared/kaito/); the list below holds either way.
# (a git worktree sits one level deeper, so the folders above are searched too).
KAITO_CRD = next((p / "shared" / "kaito" / "kaito.sh_workspaces.crd.yaml" for p in ROOT.parents
                  if (p / "shared" / "kaito" / "kaito.sh_workspaces.crd.yaml").exists()), ROOT.parent / "shared/kaito/none")
# Field paths of Kaito's v1beta1 Workspace that kaiflow must keep ([] = list items, {} = map values).
KAITO_PATHS = (
    ".resource.count", ".resource.instanceType", ".resource.labelSelector.matchLabels",
    ".resource.labelSelector.matchExpressions[].key", ".resource.preferredNodes",
    ".resource.partition.mode", ".resource.partition.count", ".resource.partition.profile",
    ".inference.preset.name", ".inference.preset.accessMode", ".inference.preset.presetOptions.modelAccessSecret",
    ".inference.adapters[].source.image", ".inference.adapters[].strength", ".inference.config", ".inference.template",
    ".tuning.preset.name", ".tuning.method", ".tuning.config", ".tuning.input.urls", ".tuning.input.volumeSource",
    ".tuning.output.image", ".tuning.output.imagePushSecret",
    ".status.conditions[].type", ".status.conditions[].observedGeneration", ".status.workerNodes",
    ".status.state", ".status.targetNodeCount", ".status.performance.metrics{}.value",
    ".status.performance.metrics{}.config{}",
)
CHECKED_IN = ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml"


def test_checked_in_crd_matches_model():
    assert CHECKED_IN.read_text() == crd_yaml(), "CRD drifted from api/: run `make crds`"


def _walk(node, path="openAPIV3Schema"):
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _walk(prop, f"{path}.properties.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}.items")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.additionalProperties")


def test_schema_is_structural():
    """Kubernetes' structural-schema rules that a generator can break."""
    crd = workspace_crd()
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert "$ref" not in node, path
            assert not ({"anyOf", "oneOf", "allOf", "not"} & node.keys()), path
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"untyped: {path}"
            if node.get("type") == "object":
                assert "properties" in node or "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields") or path.endswith("metadata"), path
                assert not ("properties" in node and "additionalProperties" in node), path
            if "default" in node:
                assert node["default"] is not None, path
        assert schema["properties"]["metadata"] == {"type": "object"}


def test_versions_status_and_printer_columns():
    crd = workspace_crd()
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert set(versions) == {"v1alpha1", "v1beta1"}
    assert [v["name"] for v in versions.values() if v["storage"]] == ["v1beta1"]
    for v in versions.values():
        assert v["served"] and v["subresources"] == {"status": {}}
        names = [c["name"] for c in v["additionalPrinterColumns"]]
        assert names == ["Instance", "ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded",
                         "TargetNodeCount", "State", "Age"]
    assert crd["metadata"]["name"] == "workspaces.kaito.sh"
    assert crd["spec"]["scope"] == "Namespaced"
    assert PRINTER_COLUMNS[0]["jsonPath"] == ".resource.instanceType"


def test_schema_has_kaito_fields_at_top_level_and_extensions():
    props = workspace_crd()["spec"]["versions"][1]["schema"]["openAPIV3Schema"]["properties"]
    assert {"resource", "inference", "tuning", "status"} <= props.keys()
    tuning = props["tuning"]["properties"]
    assert tuning["method"]["enum"] == ["lora", "qlora"]
    assert tuning["schedule"]["type"] == "string"
    assert tuning["input"]["properties"]["volumeSource"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["status"]["properties"]["conditions"]["type"] == "array"


def test_crd_yaml_has_no_anchors():
    text = crd_yaml()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == workspace_crd()


def field_paths(node, path=""):
    """Every property path of a structural schema."""
    out = {path} if path else set()
    for name, prop in (node.get("properties") or {}).items():
        out |= field_paths(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out |= field_paths(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out |= field_paths(node["additionalProperties"], f"{path}{{}}")
    return out


def _ours() -> dict[str, set[str]]:
    return {v["name"]: field_paths(v["schema"]["openAPIV3Schema"]) for v in workspace_crd()["spec"]["versions"]}


def test_crd_keeps_kaito_field_paths_listed_here():
    for version, paths in _ours().items():
        missing = [p for p in KAITO_PATHS if p not in paths]
        assert not missing, f"{version} lacks {missing}"


@pytest.mark.skipif(not KAITO_CRD.exists(), reason="Kaito's CRD is not beside the clone (shared/kaito/)")
def test_crd_is_a_superset_of_kaitos():
    """Applying kaiflow's CRD over Kaito's loses no field, short name, column or version."""
    kaito = yaml.safe_load(KAITO_CRD.read_text())
    ours_crd = workspace_crd()
    ours = _ours()
    for version in kaito["spec"]["versions"]:
        theirs = field_paths(version["schema"]["openAPIV3Schema"])
        missing = sorted(theirs - ours[version["name"]])
        assert not missing, f"{version['name']}: kaiflow's CRD lacks {missing}"
        columns = {c["name"] for v in ours_crd["spec"]["versions"] if v["name"] == version["name"]
                   for c in v["additionalPrinterColumns"]}
        assert {c["name"] for c in version.get("additionalPrinterColumns", [])} <= columns
    assert set(kaito["spec"]["names"]["shortNames"]) <= set(ours_crd["spec"]["names"]["shortNames"])
    assert kaito["spec"]["group"] == ours_crd["spec"]["group"]
    assert [v["name"] for v in kaito["spec"]["versions"] if v["storage"]] == \
        [v["name"] for v in ours_crd["spec"]["versions"] if v["storage"]]


def test_immutable_fields_are_transition_rules():
    for version in workspace_crd()["spec"]["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        for path in IMMUTABLE_FIELDS:
            node = root
            for part in path.split("."):
                node = node["properties"][part]
            assert node["x-kubernetes-validations"] == [{"rule": "self == oldSelf", "message": f"{path} is immutable"}]


def test_immutable_changes_names_the_field():
    old = {"resource": {"instanceType": "Standard_NC24ads_A100_v4", "labelSelector": {"matchLabels": {"a": "b"}}},
           "tuning": {"preset": {"name": "phi-3-mini-4k-instruct"}, "method": "qlora"}}
    accepted = immutable_values(old)
    assert immutable_changes(accepted, old) == []
    case = {**old, "tuning": {"preset": {"name": "PHI-3-mini-4k-instruct"}, "method": "lora"}}
    assert immutable_changes(accepted, case) == ["tuning.method"]
    relabelled = {**old, "resource": {**old["resource"], "labelSelector": {"matchLabels": {"a": "c"}}}}
    assert immutable_changes(accepted, relabelled) == ["resource.labelSelector"]
    # An unset field is not compared (a CEL transition rule runs only when both sides have it).
    assert immutable_changes(accepted, {"tuning": old["tuning"]}) == []
