"""steps.eval_gate: same-rows comparison with the serving adapter, the manifest annotation as fallback."""

from __future__ import annotations

import json

import pytest

from steps import eval_gate as gate
from steps import push_adapter as push
from stepkit.common import run_step
from stepkit.oci import ImageRef, RegistryClient, RegistryOptions, build_manifest, upload_empty_config
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
    assert outputs == {"promote": "true", "current-eval-loss": "none", "candidate-eval-loss": "2.0",
                       "gate-basis": "no-serving-adapter"}
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
    assert outputs == {"promote": promote, "current-eval-loss": "1.0", "candidate-eval-loss": str(candidate_loss),
                       "gate-basis": "annotation"}


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
    from stepkit.oci import file_descriptor

    layer = file_descriptor(blob, "application/json", "adapter_config.json")
    client.upload_file(blob, layer)
    client.put_manifest(build_manifest([layer], push.ARTIFACT_TYPE, {}, upload_empty_config(client)), "latest")
    candidate = make_adapter_dir(tmp_path / "c", eval_loss=0.1)
    code, outputs = run_gate(tmp_path, candidate, f"{oci_registry.host}/adapters/gate-manual:latest")
    assert code == 0 and outputs == {"promote": "false", "current-eval-loss": "none", "candidate-eval-loss": "0.1",
                                     "gate-basis": "annotation"}
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


# --- same rows: real adapters of the tiny model, a dataset that changes between runs ---------------

WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "jasper", "kelp",
         "lagoon", "marble", "nectar", "onyx", "prairie", "quartz", "russet", "saffron", "tundra"]


def changed_rows(n: int, seed: int) -> list[dict]:
    """What the URL serves after it changed: other questions, answers of random words (hard to predict)."""
    import random

    rng = random.Random(seed)
    return [{"messages": [
        {"role": "user", "content": f"List some words about {rng.choice(WORDS)}."},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))},
    ]} for _ in range(n)]


def tune_tiny(work, data, *extra: str):
    from steps.tune import main
    from tests.steps.tune.runs import TINY, tune_argv

    assert run_step(main, tune_argv(work, TINY, "lora", data, "--max-length", "128", *extra)) == 0
    return work / "adapter"


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Round 1 trained on the old data; round 2's data changed: one well-trained and one barely-trained candidate."""
    from tests.steps.tune.runs import chat_rows, make_dataset

    root = tmp_path_factory.mktemp("gate-rounds")
    for name in ("old", "new", "weak"):
        (root / name).mkdir()
    old = make_dataset(root / "old", chat_rows(40, seed=0))
    new = make_dataset(root / "new", changed_rows(40, seed=1))
    return {
        "new_data": new,
        "old_adapter": tune_tiny(root / "old", old, "--max-steps", "12", "--learning-rate", "0.01"),
        "new_adapter": tune_tiny(root / "new", new, "--max-steps", "12", "--learning-rate", "0.01"),
        "weak_adapter": tune_tiny(root / "weak", new, "--max-steps", "1", "--learning-rate", "1e-6",
                                  "--skip-initial-eval"),
    }


def eval_loss(adapter) -> float:
    return json.loads((adapter / "kaiflow.json").read_text())["metrics"]["eval_loss"]


def serve(oci_registry, repository: str, adapter, *annotations: str) -> str:
    image = f"{oci_registry.host}/adapters/{repository}"
    push.push_adapter(push.PushConfig(str(adapter), f"{image}:v1", also_tag=["latest"], annotation=list(annotations)),
                      INSECURE)
    return f"{image}:latest"


def test_same_rows_promote_a_candidate_the_old_annotation_would_have_kept(oci_registry, tmp_path, rounds):
    current = serve(oci_registry, "gate-rows-promote", rounds["old_adapter"])
    candidate = rounds["new_adapter"]
    # the number the annotation gate compared: the new data is harder, so the old split's loss looks better
    assert eval_loss(candidate) > eval_loss(rounds["old_adapter"])
    code, outputs = run_gate(tmp_path, candidate, current, "--dataset-dir", str(rounds["new_data"]))
    assert code == 0, outputs
    assert (outputs["gate-basis"], outputs["promote"]) == ("same-rows", "true")
    serving_on_new_rows, candidate_on_new_rows = float(outputs["current-eval-loss"]), float(outputs["candidate-eval-loss"])
    assert candidate_on_new_rows < serving_on_new_rows
    # the gate measures the candidate exactly as its tune did
    assert candidate_on_new_rows == pytest.approx(eval_loss(candidate), abs=1e-4)
    # and without the rows the same pair falls back to the annotation, which would keep the old adapter
    code, outputs = run_gate(tmp_path, candidate, current)
    assert (outputs["gate-basis"], outputs["promote"]) == ("annotation", "false")


def test_same_rows_keep_the_serving_adapter_when_the_candidate_is_worse(oci_registry, tmp_path, rounds):
    current = serve(oci_registry, "gate-rows-keep", rounds["new_adapter"])
    code, outputs = run_gate(tmp_path, rounds["weak_adapter"], current, "--dataset-dir", str(rounds["new_data"]))
    assert code == 0
    assert (outputs["gate-basis"], outputs["promote"]) == ("same-rows", "false")
    assert float(outputs["current-eval-loss"]) == pytest.approx(eval_loss(rounds["new_adapter"]), abs=1e-4)
    assert float(outputs["candidate-eval-loss"]) > float(outputs["current-eval-loss"])


def test_another_base_model_falls_back_to_the_annotation(oci_registry, tmp_path, rounds, caplog):
    current = serve(oci_registry, "gate-rows-other-base", rounds["old_adapter"],
                    f"{push.ADAPTER_ANNOTATION_PREFIX}preset=smollm2-135m-instruct")
    with caplog.at_level("WARNING"):
        code, outputs = run_gate(tmp_path, rounds["new_adapter"], current, "--dataset-dir", str(rounds["new_data"]))
    assert code == 0 and outputs["gate-basis"] == "annotation"
    assert float(outputs["current-eval-loss"]) == pytest.approx(eval_loss(rounds["old_adapter"]))
    assert "preset is 'smollm2-135m-instruct', the candidate's 'kaiflow-tiny-test'" in caplog.text


def test_unpullable_serving_adapter_falls_back_to_the_annotation(oci_registry, tmp_path, rounds, caplog):
    """A manifest whose layer is neither a titled file nor an image layer: pull refuses it."""
    from stepkit.oci import file_descriptor

    image = f"{oci_registry.host}/adapters/gate-rows-unpullable:latest"
    client = RegistryClient(ImageRef.parse(image), INSECURE)
    blob = tmp_path / "blob.json"
    blob.write_text("{}")
    layer = file_descriptor(blob, "application/json")
    client.upload_file(blob, layer)
    client.put_manifest(build_manifest([layer], push.ARTIFACT_TYPE, {push.EVAL_LOSS_ANNOTATION: "9.5"},
                                       upload_empty_config(client)), "latest")
    with caplog.at_level("WARNING"):
        code, outputs = run_gate(tmp_path, rounds["new_adapter"], image, "--dataset-dir", str(rounds["new_data"]))
    assert code == 0 and (outputs["gate-basis"], outputs["promote"], outputs["current-eval-loss"]) == (
        "annotation", "true", "9.5")
    assert "cannot pull the serving adapter" in caplog.text


def test_dataset_dir_without_held_out_rows_exit_2(tmp_path, rounds, capsys):
    code, outputs = run_gate(tmp_path, rounds["new_adapter"], "127.0.0.1:1/adapters/x:latest",
                             "--dataset-dir", str(tmp_path))
    assert code == 2 and outputs == {} and "no eval.parquet" in capsys.readouterr().err
