"""`kaiflow render`'s stream for `kubectl apply -f -` and `argo submit`: a Workflow named from a hash of
its content (the same file gives the same name, so applying twice runs once), the training config of
the file's ConfigMap carried inside the Workflow (argo submit drops every other document), and the
note naming what argo submit would still need. The real API server and argo CLI take the same
streams in tests/cluster/test_render_submits.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaiflow.cli import main, name_for_apply, submit_notes
from pipelines import manifest
from pipelines.names import DNS1123_LABEL, MAX_CRON_WORKFLOW_NAME, MAX_LABEL
from pipelines.target import CLUSTER_TRAINING_CONFIG_DIR, TRAINING_CONFIG_KEY

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "api" / "kaito_corpus"
TUNING = ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml"
SCHEDULED = ROOT / "examples" / "scheduled_tuning_phi_3.yaml"
INFERENCE = ROOT / "examples" / "kaito_workspace_phi_3.yaml"
WITH_CONFIG = CORPUS / "multi-doc-tuning-configmap.yaml"
WITH_SECRET = CORPUS / "multi-doc-secret-passed-through.yaml"
CONFIG_PATH = f"{CLUSTER_TRAINING_CONFIG_DIR}/{TRAINING_CONFIG_KEY}"


def _render(capsys, *args: str) -> tuple[list[dict], str]:
    assert main(["render", *args]) == 0
    captured = capsys.readouterr()
    return list(yaml.safe_load_all(captured.out)), captured.err


def _workflow(documents: list[dict]) -> dict:
    (workflow,) = [d for d in documents if d["kind"] in ("Workflow", "CronWorkflow")]
    return workflow


def _template(workflow: dict, name: str) -> dict:
    spec = workflow["spec"].get("workflowSpec") or workflow["spec"]
    return next(t for t in spec["templates"] if t["name"] == name)


def _write(tmp_path: Path, documents: list[dict], name: str = "ws.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return str(path)


# -- the name -------------------------------------------------------------------------------------


def test_the_same_file_gives_the_same_name_in_every_process():
    """Two processes with different hash seeds (set and dict orders) print the same names."""
    names = []
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "render", "-f", str(WITH_CONFIG), "-f",
                               str(INFERENCE), "-o", "name"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        names.append(done.stdout.split())
    assert names[0] == names[1]
    assert names[0][1].startswith("workflow.argoproj.io/tuning-with-config-tuning-")
    assert names[0][2].startswith("workflow.argoproj.io/workspace-phi-3-mini-inference-")


def test_a_changed_parameter_or_training_config_gives_another_name(tmp_path, capsys):
    plain = _workflow(_render(capsys, "-f", str(TUNING))[0])["metadata"]
    again = _workflow(_render(capsys, "-f", str(TUNING))[0])["metadata"]
    three = _workflow(_render(capsys, "-f", str(TUNING), "-p", "epochs=3")[0])["metadata"]
    other_ns = _workflow(_render(capsys, "-f", str(TUNING), "-n", "team-a")[0])["metadata"]
    assert plain["name"] == again["name"]
    assert len({plain["name"], three["name"], other_ns["name"]}) == 3
    # generateName stays: `argo resubmit` names its runs from it
    assert plain["generateName"] == three["generateName"] == "workspace-tuning-phi-3-mini-tuning-"
    assert plain["name"].startswith(plain["generateName"])

    documents = list(yaml.safe_load_all(WITH_CONFIG.read_text()))
    before = _workflow(_render(capsys, "-f", _write(tmp_path, documents))[0])["metadata"]["name"]
    documents[0]["data"][TRAINING_CONFIG_KEY] = documents[0]["data"][TRAINING_CONFIG_KEY].replace(
        "num_train_epochs: 1", "num_train_epochs: 2")
    after = _workflow(_render(capsys, "-f", _write(tmp_path, documents))[0])["metadata"]["name"]
    assert before != after  # the carried config is part of the Workflow, so of its name


@pytest.mark.parametrize("example", [TUNING, INFERENCE, SCHEDULED], ids=["tuning", "inference", "scheduled"])
def test_names_stay_within_the_limits_for_a_63_character_workspace_name(tmp_path, capsys, example):
    raw = yaml.safe_load(example.read_text())
    raw["metadata"]["name"] = "w" + "x" * 61 + "z"
    assert len(raw["metadata"]["name"]) == 63
    documents, _ = _render(capsys, "-f", _write(tmp_path, [raw]))
    workflow = _workflow(documents)
    name = workflow["metadata"]["name"]
    limit = MAX_CRON_WORKFLOW_NAME if workflow["kind"] == "CronWorkflow" else MAX_LABEL
    assert DNS1123_LABEL.match(name) and len(name) <= limit, name
    assert name.startswith("wxxxx")
    again, _ = _render(capsys, "-f", _write(tmp_path, [raw]))
    assert _workflow(again)["metadata"]["name"] == name
    if workflow["kind"] == "Workflow":
        assert len(name) == MAX_LABEL  # prefix cut to leave the 10 hash characters whole
        assert workflow["metadata"]["generateName"].startswith(name[:20])


def test_a_cron_workflow_keeps_its_own_name_and_a_named_object_is_left_alone(capsys):
    cron = _workflow(_render(capsys, "-f", str(SCHEDULED))[0])
    assert cron["kind"] == "CronWorkflow" and cron["metadata"]["name"] == "workspace-tuning-phi-3-weekly-tuning"
    assert "generateName" not in cron["metadata"]
    named = {"kind": "Workflow", "metadata": {"name": "mine", "generateName": "x-"}, "spec": {}}
    assert name_for_apply(named)["metadata"]["name"] == "mine"
    unnamed = {"kind": "CronWorkflow", "metadata": {"generateName": "c" * 60 + "-"}, "spec": {}}
    given = name_for_apply(unnamed)["metadata"]["name"]
    assert len(given) == MAX_CRON_WORKFLOW_NAME and DNS1123_LABEL.match(given)


def test_the_controller_path_is_unchanged():
    """The operator names its Workflows itself (controller/decide.py) and mounts the ConfigMap."""
    from api.workspace_validation import load_bundle

    bundle = load_bundle(WITH_CONFIG, mode="cluster")
    rendered = manifest(bundle.workspaces[0])
    assert "name" not in rendered["metadata"] and rendered["metadata"]["generateName"]
    assert {"name": "qlora-params", "items": [{"key": TRAINING_CONFIG_KEY, "path": TRAINING_CONFIG_KEY}]} in [
        v.get("configMap") for v in rendered["spec"]["volumes"]]
    assert "artifacts" not in (_template(rendered, "tune").get("inputs") or {})


# -- the carried training config -------------------------------------------------------------------


def _config_inputs(workflow: dict, template: str) -> tuple[list[dict], list[dict], list[str]]:
    tpl = _template(workflow, template)
    container = tpl["container"]
    mounts = [m for m in container.get("volumeMounts") or [] if m["name"] == "training-config"]
    artifacts = (tpl.get("inputs") or {}).get("artifacts") or []
    return artifacts, mounts, container["args"]


@pytest.mark.parametrize("example", [WITH_CONFIG, SCHEDULED], ids=["workflow", "cron-workflow"])
def test_the_training_config_of_the_file_travels_inside_the_workflow(tmp_path, capsys, example):
    documents = list(yaml.safe_load_all(example.read_text()))
    if example == SCHEDULED:  # give the scheduled example a ConfigMap of its own
        text = "training_config:\n  TrainingArguments:\n    num_train_epochs: 4\n"
        documents[0]["tuning"]["config"] = "weekly-params"
        documents.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "weekly-params"},
                          "data": {TRAINING_CONFIG_KEY: text}})
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    text = config_map["data"][TRAINING_CONFIG_KEY]
    rendered, err = _render(capsys, "-f", _write(tmp_path, documents))
    # the ConfigMap is still printed (kubectl apply creates it, as the file asks) ...
    assert [(d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"] == "ConfigMap"] == [
        ("ConfigMap", config_map["metadata"]["name"])]
    workflow = _workflow(rendered)
    spec = workflow["spec"].get("workflowSpec") or workflow["spec"]
    # ... but the Workflow does not need it: no ConfigMap volume, the text where the volume put it
    assert not any(v.get("configMap") for v in spec.get("volumes") or [])
    for template in ("fetch-dataset", "tune"):
        artifacts, mounts, args = _config_inputs(workflow, template)
        assert mounts == []
        assert artifacts == [{"mode": 0o444, "name": "training-config", "path": CONFIG_PATH, "raw": {"data": text}}]
        assert args[args.index("--config") + 1] == CONFIG_PATH
    assert err == ""  # argo submit / argo cron create of the Workflow alone loses nothing


def test_a_config_map_not_in_the_file_is_mounted(tmp_path, capsys):
    documents = [d for d in yaml.safe_load_all(WITH_CONFIG.read_text()) if d["kind"] == "Workspace"]
    rendered, err = _render(capsys, "-f", _write(tmp_path, documents))
    workflow = _workflow(rendered)
    assert [d["kind"] for d in rendered] == ["Workflow"]
    assert any((v.get("configMap") or {}).get("name") == "qlora-params" for v in workflow["spec"]["volumes"])
    for template in ("fetch-dataset", "tune"):
        artifacts, mounts, _ = _config_inputs(workflow, template)
        assert artifacts == [] and mounts == [{"mountPath": CLUSTER_TRAINING_CONFIG_DIR, "name": "training-config",
                                               "readOnly": True}]
    assert err == ""  # nothing of the stream is dropped: the ConfigMap lives in the cluster already


def test_a_config_with_template_braces_is_mounted_and_the_note_says_it_must_exist(tmp_path, capsys):
    documents = list(yaml.safe_load_all(WITH_CONFIG.read_text()))
    documents[0]["data"][TRAINING_CONFIG_KEY] += "    run_name: '{{not-argo}}'\n"
    rendered, err = _render(capsys, "-f", _write(tmp_path, documents))
    workflow = _workflow(rendered)
    assert any((v.get("configMap") or {}).get("name") == "qlora-params" for v in workflow["spec"]["volumes"])
    assert _config_inputs(workflow, "tune")[0] == []
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("note: ") and "contains '{{', which Argo would evaluate" in lines[0]
    assert lines[1] == (f"note: `argo submit` takes only the Workflow of this stream; workflow.argoproj.io/"
                        f"{workflow['metadata']['name']} uses ConfigMap/qlora-params from it, which must exist in "
                        "namespace default before it runs (`kubectl apply -f -` creates the whole stream)")


# -- the note on standard error -------------------------------------------------------------------


def test_the_note_names_exactly_the_secrets_the_workflow_uses(tmp_path, capsys):
    rendered, err = _render(capsys, "-f", str(WITH_SECRET))
    name = _workflow(rendered)["metadata"]["name"]
    assert err == (f"note: `argo submit` takes only the Workflow of this stream; workflow.argoproj.io/{name} uses "
                   "Secret/myregistry-push from it, which must exist in namespace default before it runs "
                   "(`kubectl apply -f -` creates the whole stream)\n")
    # a Secret of the file the Workflow does not use: argo submit drops it and the Workflow does not care
    documents = list(yaml.safe_load_all(WITH_SECRET.read_text()))
    documents[0]["metadata"]["name"] = "unused"
    _, err = _render(capsys, "-f", _write(tmp_path, documents))
    assert err == ""
    # -o json (a List, for kubectl) and -o name print no note
    assert main(["render", "-f", str(WITH_SECRET), "-o", "json"]) == 0
    assert capsys.readouterr().err == ""


def test_a_secret_handed_to_the_service_counts(tmp_path, capsys):
    """An inference Workspace's model-access Secret appears only in the deploy step's arguments."""
    workspace = yaml.safe_load((CORPUS / "gated-model-access-secret.yaml").read_text())
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "x"}}
    rendered, err = _render(capsys, "-f", _write(tmp_path, [secret, workspace]))
    assert "uses Secret/hf-token from it" in err and err.count("\n") == 1


def test_a_cron_workflow_note_names_argo_cron_create(tmp_path, capsys):
    workspace = yaml.safe_load(SCHEDULED.read_text())
    push = workspace["tuning"]["output"]["imagePushSecret"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": push}, "type": "kubernetes.io/dockerconfigjson",
              "data": {".dockerconfigjson": "e30="}}
    rendered, err = _render(capsys, "-f", _write(tmp_path, [secret, workspace]))
    assert err.startswith("note: `argo cron create` takes only the CronWorkflow of this stream; "
                          "cronworkflow.argoproj.io/workspace-tuning-phi-3-weekly-tuning uses Secret/")


def test_submit_notes_match_objects_by_namespace():
    workflow = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w", "namespace": "a"},
                "spec": {"volumes": [{"name": "v", "secret": {"secretName": "s"}}]}}
    elsewhere = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "b"}}
    assert submit_notes([elsewhere, workflow]) == []
    here = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "a"}}
    assert submit_notes([here, workflow]) == [
        "note: `argo submit` takes only the Workflow of this stream; workflow.argoproj.io/w uses Secret/s from it, "
        "which must exist in namespace a before it runs (`kubectl apply -f -` creates the whole stream)"]
