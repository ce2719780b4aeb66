"""The structural checks catch what Argo's loose schema lets through."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines import Images, Target
from pipelines.structure import StructureError, check, depends_names, problems, topological_order, workflow_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tuning_manifest() -> dict:
    target = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    return pipelines.manifest(ROOT / "examples" / "scheduled_tuning_phi_3.yaml", target)


def _dag(manifest: dict) -> dict[str, dict]:
    spec = workflow_spec(manifest)
    entry = next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])
    return {t["name"]: t for t in entry["dag"]["tasks"]}


def _template(manifest: dict, name: str) -> dict:
    return next(t for t in workflow_spec(manifest)["templates"] if t["name"] == name)


def test_rendered_manifest_is_clean(tuning_manifest):
    check(tuning_manifest)


def test_depends_names_parses_argo_expressions():
    assert depends_names("a && (b.Succeeded || c.Failed) && !d.Skipped") == ["a", "b", "c", "d"]


def test_unknown_task_in_depends(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"]["depends"] = "fetch-datasett"
    assert any("depends names unknown task 'fetch-datasett'" in p for p in problems(broken))


def test_unknown_result_in_depends(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"]["depends"] = "fetch-dataset.Succeded"
    assert any("unknown result 'Succeded'" in p for p in problems(broken))


def test_cycle(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["provision-nodes"]["depends"] = "smoke-test"
    assert any("cycle: " in p for p in problems(broken))
    with pytest.raises(ValueError, match="cycle"):
        topological_order(list(_dag(broken).values()))


def test_missing_template(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"]["template"] = "tuen"
    assert any("no template named 'tuen'" in p for p in problems(broken))


def test_undefined_input_parameter_in_container_args(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _template(broken, "tune")["container"]["args"].append("{{inputs.parameters.learning-rate}}")
    assert any("{{inputs.parameters.learning-rate}} is not an input parameter" in p for p in problems(broken))


def test_reading_an_output_of_a_task_that_does_not_run_before(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"]["arguments"]["parameters"][0]["value"] = "{{tasks.push-adapter.outputs.parameters.image}}"
    assert any("reads task 'push-adapter', which does not run before it" in p for p in problems(broken))


def test_reading_an_output_that_the_task_does_not_have(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["push-adapter"]["when"] = "{{tasks.eval-gate.outputs.parameters.promoted}} == true"
    assert any("has no output parameter 'promoted'" in p for p in problems(broken))


def test_missing_and_extra_task_arguments(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"].pop("arguments")
    _dag(broken)["fetch-dataset"]["arguments"] = {"parameters": [{"name": "url", "value": "x"}]}
    found = problems(broken)
    assert any("missing argument 'dataset-digest'" in p for p in found)
    assert any("argument 'url' is not an input of template 'fetch-dataset'" in p for p in found)


def test_volume_mount_without_volume(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    workflow_spec(broken)["volumeClaimTemplates"][0]["metadata"]["name"] = "other"
    assert any("volume mount 'kaiflow-data' names no volume" in p for p in problems(broken))


def test_hera_schema_types_are_checked(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _template(broken, "tune")["activeDeadlineSeconds"] = {"hours": 6}
    assert problems(broken)


def test_check_raises_with_every_problem(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    _dag(broken)["tune"]["template"] = "nope"
    _dag(broken)["smoke-test"]["depends"] = "ghost"
    with pytest.raises(StructureError) as excinfo:
        check(broken)
    assert len(excinfo.value.problems) >= 2


def test_generated_workflow_templates_are_structurally_sound():
    for path in sorted((ROOT / "workflow_templates").glob("*.yaml")):
        assert problems(yaml.safe_load(path.read_text())) == [], path.name


def test_unknown_fields_are_refused_where_argo_would(tuning_manifest):
    broken = copy.deepcopy(tuning_manifest)
    tune = _template(broken, "tune")
    tune["automountServiceAccountTokn"] = False
    tune["securityContext"]["fsGrup"] = 1000
    tune["metrics"]["prometheus"][0]["gauge"]["vale"] = "1"
    workflow_spec(broken)["onExt"] = "exit-handler"
    found = problems(broken)
    index = next(i for i, t in enumerate(workflow_spec(broken)["templates"]) if t["name"] == "tune")
    for where in (f"templates[{index}].automountServiceAccountTokn", f"templates[{index}].securityContext.fsGrup",
                  f"templates[{index}].metrics.prometheus[0].gauge.vale", "onExt"):
        assert any(where in p and "unknown field" in p for p in found), where


def test_the_objects_own_annotations_are_not_placeholders(tuning_manifest):
    """Argo never evaluates a Workflow's own annotations: JSON kept there (the controller's) is fine."""
    broken = copy.deepcopy(tuning_manifest)
    broken["metadata"].setdefault("annotations", {})["kaiflow.kaito.sh/immutable"] = '{"a": {"b": 1}}'
    check(broken)
    broken["spec"]["workflowSpec"]["templates"][0].setdefault("metadata", {})["annotations"] = {"x": "{{oops"}
    assert any("unbalanced" in p or "oops" in p for p in problems(broken))
