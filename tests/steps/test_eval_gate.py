"""steps.eval_gate: the candidate's held-out loss against the annotation on the serving manifest."""

from __future__ import annotations

import json

import pytest

from steps import eval_gate as gate
from steps import push_adapter as push
from steps.common import run_step
from steps.oci import ImageRef, RegistryClient, RegistryOptions, build_manifest, upload_empty_config
from tests.fixtures.registry import free_port, make_adapter_dir

INSECURE = RegistryOptions(insecure=True, attempts=2, backoff_s=0.05, timeout_s=5)


def run_gate(tmp_path, candidate, image: str, *extra: str) -> tuple[int, dict[str, str]]:
    outputs = tmp_path / "gate-outputs"
    code = run_step(gate.main, ["--candidate-dir", str(candidate), "--current-image", image, "--insecure",
                                *extra, "--outputs", str(outputs)])
    found = {p.name: p.read_text() for p in outputs.iterdir()} if outputs.exists() else {}
    return code, found


def test_first_candidate_is_promoted_when_nothing_serves(oci_registry, tmp_path, caplog):
    candidate = make_adapter_dir(tmp_path / "c", eval_loss=2.0)
    with caplog.at_level("INFO"):
        code, outputs = run_gate(tmp_path, candidate, f"{oci_registry.host}/adapters/gate-empty:latest")
    assert code == 0
    assert outputs == {"promote": "true", "current-eval-loss": "none"}
    assert "no current adapter" in caplog.text and "promoting the first candidate" in caplog.text


@pytest.mark.parametrize(("candidate_loss", "promote"), [(0.9, "true"), (1.0, "true"), (1.1, "false")])
def test_compares_with_the_serving_adapters_annotation(oci_registry, tmp_path, candidate_loss, promote):
    repository = f"adapters/gate-{str(candidate_loss).replace('.', '-')}"
    serving = make_adapter_dir(tmp_path / "serving", eval_loss=1.0)
    push.push_adapter(push.PushConfig(str(serving), f"{oci_registry.host}/{repository}:v1", also_tag=["latest"]),
                      INSECURE)
    candidate = make_adapter_dir(tmp_path / "candidate", eval_loss=candidate_loss, seed=1)
    code, outputs = run_gate(tmp_path, candidate, f"{oci_registry.host}/{repository}:latest")
    assert code == 0
    assert outputs == {"promote": promote, "current-eval-loss": "1.0"}


def test_scheduled_round_trip_promotes_then_keeps(oci_registry, tmp_path):
    """Two retuning rounds as the pipeline runs them: gate, then push with --also-tag latest only if promoted."""
    image = f"{oci_registry.host}/adapters/gate-schedule"
    losses = []
    for round_, loss in enumerate([1.5, 1.2, 1.4]):
        candidate = make_adapter_dir(tmp_path / f"round{round_}", eval_loss=loss, seed=round_)
        decision = gate.decide(gate.GateConfig(str(candidate), f"{image}:latest"), INSECURE)
        also = ["latest"] if decision.promote else []
        push.push_adapter(push.PushConfig(str(candidate), image, tag="auto", also_tag=also), INSECURE)
        losses.append((decision.promote, decision.current_eval_loss))
    assert losses == [(True, None), (True, 1.5), (False, 1.2)]
    manifest, _, _ = RegistryClient(ImageRef.parse(f"{image}:latest"), INSECURE).fetch_manifest()
    assert manifest["annotations"][push.EVAL_LOSS_ANNOTATION] == "1.2"


def test_unannotated_current_image_is_kept(oci_registry, tmp_path, caplog):
    client = RegistryClient(ImageRef.parse(f"{oci_registry.host}/adapters/gate-manual:latest"), INSECURE)
    blob = tmp_path / "adapter_config.json"
    blob.write_text("{}")
    from steps.oci import file_descriptor

    layer = file_descriptor(blob, "application/json", "adapter_config.json")
    client.upload_file(blob, layer)
    client.put_manifest(build_manifest([layer], push.ARTIFACT_TYPE, {}, upload_empty_config(client)), "latest")
    candidate = make_adapter_dir(tmp_path / "c", eval_loss=0.1)
    code, outputs = run_gate(tmp_path, candidate, f"{oci_registry.host}/adapters/gate-manual:latest")
    assert code == 0 and outputs == {"promote": "false", "current-eval-loss": "none"}
    assert "has no numeric sh.kaito.kaiflow.eval-loss annotation" in caplog.text


@pytest.mark.parametrize(("kaiflow_json", "expected"), [
    (None, "kaiflow.json is missing"),
    ("{not json", "is not valid JSON"),
    (json.dumps({"metrics": {"train_loss": 1.0}}), "no number at metrics.eval_loss"),
    (json.dumps({"metrics": {"eval_loss": "low"}}), "no number at metrics.eval_loss"),
])
def test_bad_candidate_metadata_exit_2(tmp_path, capsys, kaiflow_json, expected):
    candidate = make_adapter_dir(tmp_path / "c")
    if kaiflow_json is None:
        (candidate / "kaiflow.json").unlink()
    else:
        (candidate / "kaiflow.json").write_text(kaiflow_json)
    code, outputs = run_gate(tmp_path, candidate, "127.0.0.1:1/adapters/x:latest")
    assert code == 2 and expected in capsys.readouterr().err and outputs == {}


def test_unreachable_registry_exits_1_and_promotes_nothing(tmp_path, capsys):
    candidate = make_adapter_dir(tmp_path / "c")
    code, outputs = run_gate(tmp_path, candidate, f"127.0.0.1:{free_port()}/adapters/x:latest",
                             "--attempts", "2", "--backoff-s", "0.01")
    assert code == 1 and outputs == {}
    assert "after 2 attempts" in capsys.readouterr().err


def test_wrong_password_fails_the_gate_instead_of_promoting(oci_registry_auth, tmp_path, capsys):
    bad = oci_registry_auth.write_docker_config(tmp_path / "bad.json", password="nope-nope")
    candidate = make_adapter_dir(tmp_path / "c")
    code, outputs = run_gate(tmp_path, candidate, f"{oci_registry_auth.host}/adapters/x:latest",
                             "--docker-config", str(bad))
    err = capsys.readouterr().err
    assert code == 2 and outputs == {}
    assert "401" in err and oci_registry_auth.host in err and "nope-nope" not in err
