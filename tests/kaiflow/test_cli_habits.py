"""kubectl's and argo's habits: -f/-R/-, -n, -o, -p, completion, help with defaults, Secrets passed through."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaiflow.cli import command, main

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "api" / "kaito_corpus"
PHI = ROOT / "examples" / "kaito_workspace_phi_3.yaml"
TUNING = ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml"
SECRET_FILE = CORPUS / "multi-doc-secret-passed-through.yaml"


def _kaiflow(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaiflow.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_filename_repeatable_directories_and_recursive(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(PHI.read_text())
    (tmp_path / "sub" / "b.yml").write_text(TUNING.read_text())
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert main(["validate", "-f", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("ok ") == 1  # like kubectl: no descent without -R
    assert main(["validate", "-R", "-f", str(tmp_path), "-f", str(PHI)]) == 0
    assert capsys.readouterr().out.count("ok ") == 3
    capsys.readouterr()
    assert main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 1  # a file that cannot be read
    assert "cannot read file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["validate", "-f", str(tmp_path / "empty")]) == 2
    assert "no .yaml, .yml, .json files" in capsys.readouterr().err


def test_filename_dash_reads_standard_input():
    done = _kaiflow("render", "-f", "-", "-o", "name", stdin=PHI.read_text())
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"workflow\.argoproj\.io/workspace-phi-3-mini-inference-[0-9a-f]{10}", done.stdout.strip())


def test_render_output_formats(capsys):
    source = str(CORPUS / "multi-doc-tuning-configmap.yaml")
    assert main(["render", "-f", source, "-o", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["apiVersion"] == "v1" and listing["kind"] == "List"
    assert [i["kind"] for i in listing["items"]] == ["ConfigMap", "Workflow"]
    assert main(["render", "-f", source, "-o", "name"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names[0] == "configmap/qlora-params"
    assert re.fullmatch(r"workflow\.argoproj\.io/tuning-with-config-tuning-[0-9a-f]{10}", names[1])
    assert main(["render", "-f", source]) == 0
    captured = capsys.readouterr()
    documents = list(yaml.safe_load_all(captured.out))
    assert [d["kind"] for d in documents] == ["ConfigMap", "Workflow"]
    assert f"workflow.argoproj.io/{documents[1]['metadata']['name']}" == names[1]
    # the Workflow carries the training config, so `argo submit` of it alone loses nothing: no note
    assert captured.err == ""


def test_namespace_flag_fills_and_refuses_a_mismatch(tmp_path, capsys):
    assert main(["render", "-n", "team-a", "-f", str(CORPUS / "multi-doc-tuning-configmap.yaml"), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert {i["metadata"]["namespace"] for i in items} == {"team-a"}
    other = yaml.safe_load(PHI.read_text())
    other["metadata"]["namespace"] = "team-b"
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(other))
    assert main(["validate", "-n", "team-a", str(path)]) == 1
    assert "does not match the namespace given with -n ('team-a')" in capsys.readouterr().err
    assert main(["validate", "-n", "team-b", str(path), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["workspaces"][0]["namespace"] == "team-b"


def test_validate_json_has_the_same_keys_for_valid_and_invalid_files(capsys):
    files = [str(PHI), str(CORPUS / "url-loopback.yaml")]
    assert main(["validate", "-o", "json", *files]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r["valid"] for r in results] == [True, False]
    assert {tuple(sorted(r)) for r in results} == {("errors", "file", "valid", "warnings", "workspaces")}
    assert results[0]["errors"] == [] and results[1]["workspaces"] == [] and results[1]["errors"]


@pytest.mark.parametrize("schedule", ["@weekly", "@daily", "@hourly", "@monthly", "@yearly", "@annually",
                                      "@midnight", "@every 6h", "@every 1h30m", "0 3 * * 0"])
def test_argo_cron_specials_are_accepted(tmp_path, schedule, capsys):
    raw = yaml.safe_load(TUNING.read_text())
    raw["tuning"]["schedule"] = schedule
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["render", str(path), "-o", "json"]) == 0
    cron = json.loads(capsys.readouterr().out)["items"][-1]
    assert cron["kind"] == "CronWorkflow" and schedule in json.dumps(cron["spec"])


@pytest.mark.parametrize("schedule", ["@fortnightly", "@every", "@every soon", "every sunday"])
def test_other_schedules_are_refused(tmp_path, schedule, capsys):
    raw = yaml.safe_load(TUNING.read_text())
    raw["tuning"]["schedule"] = schedule
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 1
    assert "tuning.schedule" in capsys.readouterr().err


def test_secrets_pass_through_render_untouched_and_never_logged(capsys):
    original = next(d for d in yaml.safe_load_all(SECRET_FILE.read_text()) if d["kind"] == "Secret")
    value = original["data"][".dockerconfigjson"]
    assert main(["validate", "-o", "json", str(SECRET_FILE)]) == 0
    captured = capsys.readouterr()
    assert value not in captured.out + captured.err
    assert main(["render", "-f", str(SECRET_FILE)]) == 0
    captured = capsys.readouterr()
    documents = list(yaml.safe_load_all(captured.out))
    assert [d["kind"] for d in documents] == ["Secret", "Workflow"]
    assert documents[0]["data"] == original["data"] and documents[0]["type"] == original["type"]
    assert documents[0]["metadata"] == {"name": "myregistry-push", "namespace": "default"}
    assert value not in captured.err


def test_render_target_local_is_what_run_executes(tmp_path, capsys):
    from local_runner.runner import local_manifest

    example = ROOT / "examples" / "local_tuning_tiny.yaml"
    assert main(["render", "--target", "local", "--workdir", str(tmp_path), "-f", str(example), "-o", "json"]) == 0
    rendered = json.loads(capsys.readouterr().out)["items"][0]
    assert rendered == local_manifest(example, tmp_path)
    assert main(["render", "--target", "local", "--workdir", str(tmp_path), "-f", str(example),
                 "-p", "output-image=127.0.0.1:5999/x/y:v2", "-o", "json"]) == 0
    parameters = json.loads(capsys.readouterr().out)["items"][0]["spec"]["arguments"]["parameters"]
    assert {p["name"]: p["value"] for p in parameters}["output-image"] == "127.0.0.1:5999/x/y:v2"


def test_unknown_or_malformed_parameters_are_usage_errors(capsys):
    for bad in (["-p", "nope=1"], ["-p", "no-equals-sign"]):
        assert main(["render", "-f", str(TUNING), *bad]) == 2
    assert "unknown workflow parameter(s) nope" in capsys.readouterr().err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell, capsys):
    assert main(["completion", shell]) == 0
    assert "_KAIFLOW_COMPLETE" in capsys.readouterr().out


def test_completion_answers_the_shell():
    env = dict(os.environ, _KAIFLOW_COMPLETE="complete_bash", COMP_WORDS="kaiflow render -o ", COMP_CWORD="3")
    done = _kaiflow(env=env)
    assert done.stdout.split() == ["yaml", "json", "name"]
    env |= {"COMP_WORDS": "kaiflow ren", "COMP_CWORD": "1"}
    assert _kaiflow(env=env).stdout.split() == ["render"]


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in (getattr(cmd, "commands", None) or {}).items():
        yield from _walk(sub, (*path, name))


def test_every_option_has_help_and_its_default_shown():
    missing = []
    for path, cmd in _walk(command()):
        if path == ("controller",):  # its options are the operator's own: `kaiflow controller --help`
            continue
        for param in cmd.params:
            if not getattr(param, "help", None):
                missing.append(f"{' '.join(path)} {param.name}: no help")
            if getattr(param, "show_default", None) is False and param.default not in (None, False, ()):
                missing.append(f"{' '.join(path)} {param.name}: default not shown")
    assert not missing, missing
    assert "[default: .kaiflow]" in _kaiflow("run", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_run_reads_standard_input_with_relative_urls_from_here(tmp_path):
    """`kaiflow run -f -`: file: URLs resolve against the current directory, as for a file there."""
    text = (ROOT / "examples" / "local_tuning_tiny.yaml").read_text().replace("file:data/", "file:examples/data/").replace(
        "config: configs/", "config: examples/configs/")
    done = _kaiflow("run", "-f", "-", "--workdir", str(tmp_path / "work"), "-p", "output-image=127.0.0.1:1/x/y:v1",
                    stdin=text)
    assert done.returncode == 2  # refused before the first task: nothing answers on 127.0.0.1:1
    assert "registry 127.0.0.1:1" in done.stderr
    assert "dataset" not in done.stderr and "training config" not in done.stderr  # both found from here
