"""The CRD is generated from the model, structural, and the checked-in copy does not drift."""

from pathlib import Path

import yaml

from api.crd import PRINTER_COLUMNS, crd_yaml, workspace_crd

ROOT = Path(__file__).resolve().parents[2]
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
        assert names == ["Instance", "ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded", "Age"]
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
