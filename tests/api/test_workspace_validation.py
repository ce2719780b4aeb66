"""Kaito's rules: good Workspaces load, each bad one fails naming its offending path."""

import re
from pathlib import Path

import pytest
import yaml

from api import Workspace, WorkspaceValidationError, load_workspace, validate_workspace

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD = sorted((Path(__file__).parent / "bad_workspaces").glob("*.yaml"))


def _expectations(path: Path) -> tuple[str, str]:
    header = dict(re.findall(r"^# expect-(path|message): ?(.*)$", path.read_text(), re.MULTILINE))
    return header["path"], header["message"]


def test_bad_corpus_is_large_enough():
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path):
    ws = load_workspace(path)
    assert isinstance(ws, Workspace)
    assert (ws.tuning is None) != (ws.inference is None)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_workspace_names_its_path(path):
    expected_path, expected_text = _expectations(path)
    with pytest.raises(WorkspaceValidationError) as info:
        load_workspace(path)
    matching = [e for e in info.value.errors if e.path == expected_path]
    assert matching, f"no error at {expected_path!r}; got {[str(e) for e in info.value.errors]}"
    assert any(expected_text in e.message for e in matching), [str(e) for e in matching]
    # the rendered message carries the path too, so a user sees where to look
    assert expected_path in str(info.value)


def test_kaito_phi3_examples_round_trip_unchanged():
    """Kaito users' YAML is accepted as written and dumps back to the same fields."""
    for name in ("kaito_workspace_phi_3.yaml", "kaito_workspace_phi_3_with_adapters.yaml", "kaito_workspace_tuning_phi_3.yaml"):
        raw = yaml.safe_load((ROOT / "examples" / name).read_text())
        ws = validate_workspace(raw)
        dumped = ws.to_dict()
        for key in ("apiVersion", "kind", "resource", "inference", "tuning"):
            if key in raw:
                assert _subset(raw[key], dumped[key]), key


def _subset(a, b) -> bool:
    if isinstance(a, dict):
        return all(k in b and _subset(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_subset(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_all_errors_are_reported_at_once():
    raw = yaml.safe_load((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text())
    raw["tuning"]["method"] = "full"
    raw["tuning"]["extra"] = 1
    raw["resource"]["count"] = 0
    with pytest.raises(WorkspaceValidationError) as info:
        validate_workspace(raw)
    assert {e.path for e in info.value.errors} == {"tuning.method", "tuning.extra", "resource.count"}


def test_both_versions_accepted():
    raw = yaml.safe_load((ROOT / "examples" / "kaito_workspace_phi_3.yaml").read_text())
    for version in ("kaito.sh/v1alpha1", "kaito.sh/v1beta1"):
        assert validate_workspace({**raw, "apiVersion": version}).api_version == version


def test_defaults_and_accessors():
    raw = yaml.safe_load((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text())
    del raw["tuning"]["method"]
    ws = validate_workspace(raw)
    assert ws.tuning.method == "lora"
    assert ws.resource.count == 1
    assert ws.namespace == "default"
    assert ws.preset_name == "phi-3-mini-4k-instruct"
    assert ws.is_tuning


def test_missing_instance_type_is_allowed():
    raw = yaml.safe_load((ROOT / "examples" / "kaito_workspace_phi_3.yaml").read_text())
    del raw["resource"]["instanceType"]
    assert validate_workspace(raw).resource.instance_type is None


def test_yaml_errors_and_empty_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: [unclosed\n")
    with pytest.raises(WorkspaceValidationError, match="not valid YAML"):
        load_workspace(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(WorkspaceValidationError, match="no Workspace"):
        load_workspace(empty)
    with pytest.raises(WorkspaceValidationError, match="cannot read file"):
        load_workspace(tmp_path / "missing.yaml")


def test_bring_your_own_nodes_may_select_an_existing_pool_but_not_kaiflows_own_labels():
    """Issue 17, Medium 10: with bring-your-own nodes nothing is provisioned or released, so the
    provisioners' keys (agentpool, instance type) may select existing nodes; kaiflow's bookkeeping
    keys (kaito.sh/workspace, ...) never."""
    def workspace(labels):
        return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace",
                "metadata": {"name": "byo", "annotations": {"kaiflow.kaito.sh/bring-your-own-nodes": "true"}},
                "resource": {"labelSelector": {"matchLabels": labels}},
                "inference": {"preset": {"name": "phi-3-mini-4k-instruct"}}}

    validate_workspace(workspace({"agentpool": "gpu"}))
    with pytest.raises(WorkspaceValidationError, match="kaito.sh/workspacenamespace is a label kaiflow sets"):
        validate_workspace(workspace({"kaito.sh/workspacenamespace": "team-b"}))
