"""Issue 9: Workflows an Argo user can drive - arguments to change on resubmit, Argo's own
Prometheus metrics from the steps' outputs, and an exit handler that releases the nodes."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

import pipelines
from pipelines import Images, Target
from pipelines.structure import problems, workflow_spec

ROOT = Path(__file__).resolve().parents[2]
KAITO_TUNING = ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml"


def _cluster() -> Target:
    return Target.cluster(images=Images(), provider="aks", insecure_registries=())


def _templates(manifest: dict) -> dict[str, dict]:
    return {t["name"]: t for t in workflow_spec(manifest)["templates"]}


def _arguments(manifest: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in workflow_spec(manifest)["arguments"]["parameters"]}


def _value(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_values_a_user_changes_on_resubmit_are_workflow_arguments():
    manifest = pipelines.manifest(KAITO_TUNING, _cluster())
    arguments = _arguments(manifest)
    assert arguments == {
        "dataset-url": "https://huggingface.co/datasets/philschmid/dolly-15k-oai-style/resolve/main/data/"
                       "train-00000-of-00001-54e3756291ca09c6.parquet?download=true",
        "output-image": "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1",
        "epochs": "1",
        "release-nodes": "on-failure",
    }
    templates = _templates(manifest)
    assert _value(templates["fetch-dataset"]["container"]["args"], "--url") == ["{{workflow.parameters.dataset-url}}"]
    assert _value(templates["tune"]["container"]["args"], "--epochs") == ["{{workflow.parameters.epochs}}"]
    assert _value(templates["push-adapter"]["container"]["args"], "--image") == ["{{workflow.parameters.output-image}}"]
    # every argument is used somewhere (none is decoration)
    text = yaml.safe_dump(workflow_spec(manifest)["templates"])
    assert all(f"{{{{workflow.parameters.{name}}}}}" in text for name in arguments)


def test_several_dataset_urls_and_a_training_config(tmp_path: Path):
    workspace = yaml.safe_load(KAITO_TUNING.read_text())
    workspace["tuning"]["input"]["urls"] = ["https://a.example/1.parquet", "https://b.example/2.jsonl"]
    workspace["tuning"]["config"] = "my-training-config"
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(workspace))
    manifest = pipelines.manifest(path, _cluster())
    arguments = _arguments(manifest)
    assert arguments["dataset-url-1"] == "https://a.example/1.parquet"
    assert arguments["dataset-url-2"] == "https://b.example/2.jsonl"
    assert "epochs" not in arguments  # the training config holds them
    fetch = _templates(manifest)["fetch-dataset"]["container"]["args"]
    assert _value(fetch, "--url") == ["{{workflow.parameters.dataset-url-1}}", "{{workflow.parameters.dataset-url-2}}"]
    assert "--epochs" not in _templates(manifest)["tune"]["container"]["args"]


def test_tune_emits_argo_metrics_from_its_output_parameters():
    templates = _templates(pipelines.manifest(KAITO_TUNING, _cluster()))
    metrics = {p["name"]: p for p in templates["tune"]["metrics"]["prometheus"]}
    assert metrics["kaiflow_tune_eval_loss"]["gauge"]["value"] == "{{outputs.parameters.eval-loss}}"
    assert metrics["kaiflow_tune_tokens_per_second"]["gauge"]["value"] == "{{outputs.parameters.tokens-per-second}}"
    assert metrics["kaiflow_tune_eval_loss"]["when"] == "{{status}} == Succeeded"
    outputs = {p["name"]: p for p in templates["tune"]["outputs"]["parameters"]}
    # the tune step writes it (steps/tune/run.py), like train-loss and eval-loss
    assert outputs["tokens-per-second"]["valueFrom"]["path"].endswith("/tokens-per-second")
    for name, template in templates.items():
        if "container" in template:
            durations = [p for p in template["metrics"]["prometheus"] if p["name"] == "kaiflow_step_duration_seconds"]
            assert durations and durations[0]["gauge"]["value"] == "{{duration}}", name


def test_structure_checks_metric_references_and_names():
    manifest = pipelines.manifest(KAITO_TUNING, _cluster())
    broken = copy.deepcopy(manifest)
    tune = _templates(broken)["tune"]
    tune["metrics"]["prometheus"][0]["gauge"]["value"] = "{{outputs.parameters.eval-los}}"
    tune["metrics"]["prometheus"][1]["name"] = "kaiflow-tune-loss"
    found = problems(broken)
    assert any("{{outputs.parameters.eval-los}} is not an output parameter" in p for p in found)
    assert any("invalid metric name 'kaiflow-tune-loss'" in p for p in found)


def test_hand_submitted_workflow_releases_its_nodes_on_exit():
    manifest = pipelines.manifest(KAITO_TUNING, _cluster())
    spec = workflow_spec(manifest)
    templates = _templates(manifest)
    handler = templates[spec["onExit"]]
    (task,) = handler["dag"]["tasks"]
    assert "{{workflow.status}} != Succeeded" in task["when"]
    release = templates[task["template"]]["container"]
    assert release["command"] == ["python", "-m", "steps.provision"]
    assert release["args"] == ["--delete", "--provider", "aks", "--workspace-name", "workspace-tuning-phi-3-mini",
                               "--namespace", "default"]
    assert "automountServiceAccountToken" not in templates[task["template"]]  # it calls the API


def test_controller_and_local_workflows_have_no_exit_handler(tmp_path: Path):
    workspace = yaml.safe_load(KAITO_TUNING.read_text())
    workspace["metadata"]["uid"] = "0a1b2c3d-0000-4000-8000-000000000000"
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(workspace))
    owned = pipelines.manifest(path, _cluster())
    assert "onExit" not in workflow_spec(owned) and "release-nodes" not in _arguments(owned)
    local = pipelines.manifest(ROOT / "examples" / "local_tuning_tiny.yaml",
                               Target.local(tmp_path / "w", base_dir=ROOT / "examples", port=3000))
    assert "onExit" not in workflow_spec(local)
    inference = pipelines.manifest(ROOT / "examples" / "kaito_workspace_phi_3.yaml", _cluster())
    assert workflow_spec(inference)["onExit"] == "exit-handler"
