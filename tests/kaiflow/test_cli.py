"""The CLI face: exit codes, output formats, standard input, warnings, and that validate stays light."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaiflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "api" / "kaito_corpus"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
LOCAL_EXAMPLES = [p for p in EXAMPLES if p.name.startswith("local_")]
CLUSTER_EXAMPLES = [p for p in EXAMPLES if not p.name.startswith("local_")]


def test_validate_examples_ok(capsys):
    assert main(["validate", *map(str, CLUSTER_EXAMPLES)]) == 0
    assert main(["validate", "--mode", "local", *map(str, LOCAL_EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == len(EXAMPLES)


def test_local_examples_are_refused_for_a_cluster(capsys):
    assert main(["validate", str(ROOT / "examples" / "local_tuning_tiny.yaml")]) == 1
    err = capsys.readouterr().err
    assert "file: URLs are for `kaiflow run`" in err and "tuning.output.imagePushSecret" in err


def test_validate_lists_every_error_and_exits_1(capsys):
    bad = sorted(str(p) for p in (ROOT / "tests" / "api" / "bad_workspaces").glob("*.yaml"))
    good = str(ROOT / "examples" / "kaito_workspace_phi_3.yaml")
    assert main(["validate", good, *bad]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("FAIL ") == len(bad)
    assert "tuning.method: must be 'lora' or 'qlora'" in captured.err
    assert "ok " in captured.out


def test_validate_json_and_yaml_output(capsys):
    files = [str(CORPUS / "generic-hf-id.yaml"), str(CORPUS / "url-loopback.yaml")]
    assert main(["validate", "-o", "json", *files]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["valid"] for r in results] == [True, False]
    assert results[0]["workspaces"][0]["model"] == "contoso/llama-3-8b-support-bot"
    assert results[0]["workspaces"][0]["gpuMemoryGiB"] is None
    assert results[0]["warnings"][0]["path"] == "inference.preset.name"
    assert results[1]["errors"][0]["path"] == "tuning.input.urls[0]"
    assert "warning: " in captured.err and "sizing is deferred" in captured.err  # warnings on stderr
    assert main(["validate", "-o", "yaml", str(CORPUS / "legacy-gpt-oss-20b.yaml")]) == 0
    summary = yaml.safe_load(capsys.readouterr().out)[0]["workspaces"][0]
    assert summary["servedModelName"] == "gpt-oss-20b" and summary["instanceType"] == "Standard_NC24ads_A100_v4"
    assert summary["targetNodeCount"] == 1


def test_validate_reads_standard_input():
    text = (ROOT / "examples" / "kaito_workspace_phi_3.yaml").read_text()
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "validate", "-"], input=text, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and "ok   <stdin>: workspace-phi-3-mini" in done.stdout
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "validate", "-"], input="kind: [", capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1 and "not valid YAML" in done.stderr


def test_exit_codes_usage_and_internal(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        main(["validate", "--output", "xml", "x.yaml"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("kaiflow ")

    import api.workspace_validation

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api.workspace_validation, "load_bundle", broken)
    assert main(["validate", str(EXAMPLES[0])]) == 2
    assert capsys.readouterr().err.strip() == "internal error: RuntimeError: boom"


def test_help_documents_exit_codes():
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "validate", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "exit codes:" in done.stdout and "2  usage error" in done.stdout


def test_validate_does_not_import_torch():
    code = (
        "import sys; from kaiflow.cli import main; "
        f"rc = main(['validate', r'{ROOT / 'examples' / 'kaito_workspace_tuning_phi_3.yaml'}', r'{CORPUS / 'legacy-gpt-oss-20b.yaml'}']); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bentoml') if m in sys.modules]; "
        "assert rc == 0 and not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_presets_table_and_json(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "phi-3-mini-4k-instruct" in out and "smollm2-135m-instruct" in out and "Standard_" in out
    assert "openai/gpt-oss-20b (gpt-oss-20b)" in out
    assert main(["presets", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["mistral-7b-instruct"]["servedModelName"] == "mistral-7b-instruct-v0.3"
    assert by_name["meta-llama/Llama-3.3-70B-Instruct"]["aliases"] == ["llama-3.3-70b-instruct"]
    assert by_name["deepseek-ai/DeepSeek-R1-0528"]["inferenceSku"] == "Standard_ND96isr_H200_v5"
    assert {r["origin"] for r in rows} == {"kaiflow", "kaito-catalog"}


def test_render_emits_companions_before_the_workflow(capsys):
    assert main(["render", str(CORPUS / "multi-doc-tuning-configmap.yaml")]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Workflow"]
    assert documents[0]["metadata"] == {"name": "qlora-params", "namespace": "default"}
    # the Workflow carries the ConfigMap's training config itself (tests/kaiflow/test_render_submit.py)
    volumes = documents[1]["spec"].get("volumes") or []
    assert not any(v.get("configMap") for v in volumes)


def test_render_applies_the_inference_config_of_the_same_file(capsys):
    assert main(["render", str(CORPUS / "multi-doc-inference-config-cluster.yaml")]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    workflow = documents[-1]
    deploy = next(t for t in workflow["spec"]["templates"] if t["name"] == "deploy-inference")
    args = deploy["container"]["args"]
    settings = [args[i + 1] for i, a in enumerate(args) if a == "--service-env"]
    assert settings and all(s.startswith("KAIFLOW_") for s in settings)
    # vllm.max-model-len 4096 becomes the service's prompt + new-token budget
    assert sorted(settings) == ["KAIFLOW_MAX_NEW_TOKENS=512", "KAIFLOW_MAX_PROMPT_TOKENS=3584"]


def test_render_refuses_an_oversized_workflow(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text())
    raw["tuning"]["input"]["urls"] = [f"https://example.com/{'d' * 1900}/part-{n}.parquet" for n in range(600)]
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0
    assert main(["render", str(path)]) == 1
    assert "over the 1048576-byte limit for one Kubernetes object (etcd)" in capsys.readouterr().err


def test_render_refuses_local_files_for_a_cluster(capsys):
    assert main(["render", str(ROOT / "examples" / "local_tuning_tiny.yaml")]) == 1
    assert "tuning.input.urls[0]" in capsys.readouterr().err


def test_run_takes_the_training_config_from_the_same_file(tmp_path):
    """``kaiflow run`` on a Workspace + ConfigMap file: the tune step reads the ConfigMap's training_config.yaml."""
    from local_runner.runner import local_manifest

    workspace = yaml.safe_load((ROOT / "examples" / "local_tuning_tiny.yaml").read_text())
    workspace["tuning"]["config"] = "tiny-params"
    workspace["tuning"]["input"]["urls"] = [(ROOT / "examples" / "data" / "demo_chat.parquet").as_uri()]
    config_text = (ROOT / "examples" / "configs" / "tiny_training_config.yaml").read_text()
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-params"},
                  "data": {"training_config.yaml": config_text}}
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump_all([workspace, config_map]))
    assert main(["validate", "--mode", "local", str(path)]) == 0
    manifest = local_manifest(path, tmp_path / "work")
    tune = next(t for t in manifest["spec"]["templates"] if t["name"] == "tune")
    args = tune["container"]["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert config_path == tmp_path / "work" / "configmaps" / "tiny-params" / "training_config.yaml"
    assert config_path.read_text() == config_text


def test_crd_command(capsys):
    assert main(["crd"]) == 0
    assert "name: workspaces.kaito.sh" in capsys.readouterr().out


def test_render_reads_standard_input_and_needs_a_workspace():
    text = (CORPUS / "multi-doc-two-workspaces.yaml").read_text()
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "render", "-"], input=text, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [d["metadata"]["labels"]["kaito.sh/workspace"] for d in yaml.safe_load_all(done.stdout)] == ["first", "second"]
    only_config = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n"
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "render", "-"], input=only_config, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 1 and "no Workspace in the file" in done.stderr


def test_run_applies_the_inference_config_of_the_same_file(tmp_path):
    """``kaiflow run`` on a Workspace + inference ConfigMap: the local service gets max-model-len's limits."""
    from local_runner.runner import local_manifest

    path = tmp_path / "inference.yaml"
    path.write_text((CORPUS / "multi-doc-inference-config-local.yaml").read_text())
    manifest = local_manifest(path, tmp_path / "work")
    deploy = next(t for t in manifest["spec"]["templates"] if t["name"] == "deploy-inference")
    env = {e["name"]: e["value"] for e in deploy["container"].get("env") or []}
    assert env == {"KAIFLOW_MAX_NEW_TOKENS": "512", "KAIFLOW_MAX_PROMPT_TOKENS": "3584"}  # max-model-len 4096
