"""workflow_templates/ is generated from pipelines/ and must not drift."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines import templates

ROOT = Path(__file__).resolve().parents[2]


def test_workflow_templates_are_up_to_date():
    assert templates.main([str(ROOT / "workflow_templates"), "--check"]) == 0, (
        "workflow_templates/ drifted from pipelines/: run `python -m pipelines.templates workflow_templates/`"
    )


def test_one_template_per_step_each_runs_its_step_module(tmp_path: Path):
    assert templates.main([str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert written == sorted(f"kaiflow-{s}.yaml" for s in templates.STEP_TEMPLATES)
    for path in tmp_path.glob("*.yaml"):
        manifest = yaml.safe_load(path.read_text())
        assert manifest["kind"] == "WorkflowTemplate"
        entry = next(t for t in manifest["spec"]["templates"] if t["name"] == manifest["spec"]["entrypoint"])
        step = path.stem.removeprefix("kaiflow-").replace("-", "_")
        assert entry["container"]["command"] == ["python", "-m", f"steps.{step}"]
        # `argo submit --from workflowtemplate/... -p name=value`: every input is a workflow argument
        arguments = {p["name"] for p in manifest["spec"]["arguments"]["parameters"]}
        assert {p["name"] for p in entry.get("inputs", {}).get("parameters", [])} <= arguments


def test_check_reports_drift(tmp_path: Path):
    templates.main([str(tmp_path)])
    (tmp_path / "kaiflow-tune.yaml").write_text("edited by hand\n")
    assert templates.main([str(tmp_path), "--check"]) == 1
