"""steps.push_adapter against real `docker-registry` processes (anonymous, htpasswd, stopped)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from steps import push_adapter as push
from stepkit.common import run_step
from stepkit.oci import OCI_MANIFEST, RegistryOptions, RegistryUnavailableError
from tests.fixtures.registry import free_port, make_adapter_dir

FAST_RETRIES = RegistryOptions(insecure=True, attempts=3, backoff_s=0.05, timeout_s=5)


def get_manifest(registry, repository: str, reference: str) -> tuple[int, dict | None]:
    """Read a manifest with plain urllib: an independent check of what the registry stores."""
    request = urllib.request.Request(f"{registry.url}/v2/{repository}/manifests/{reference}",
                                     headers={"Accept": OCI_MANIFEST})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_push_cli_writes_manifest_with_titles_artifact_type_and_annotations(oci_registry, tune_output_dir, tmp_path):
    outputs = tmp_path / "outputs"
    image = f"{oci_registry.host}/adapters/push-cli"
    code = run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image", image, "--tag", "auto",
                                "--also-tag", "latest", "--insecure", "--annotation", "team=nlp",
                                "--outputs", str(outputs)])
    assert code == 0
    digest = (outputs / "adapter-digest").read_text()
    pushed = (outputs / "image").read_text()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    tag = pushed.rsplit(":", 1)[1]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", tag), tag

    status, manifest = get_manifest(oci_registry, "adapters/push-cli", tag)
    assert status == 200
    assert manifest["artifactType"] == push.ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    titles = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in manifest["layers"]}
    assert titles == {name: push.MEDIA_TYPES[name] for name in
                      ("adapter_config.json", "adapter_model.safetensors", "kaiflow.json", "loss.json", "loss.png")}
    sizes = {layer["annotations"]["org.opencontainers.image.title"]: layer["size"] for layer in manifest["layers"]}
    assert sizes["adapter_model.safetensors"] == (tune_output_dir / "adapter_model.safetensors").stat().st_size

    annotations = manifest["annotations"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", annotations["org.opencontainers.image.created"])
    assert annotations["sh.kaito.kaiflow.preset"] == "kaiflow-tiny-test"
    assert annotations["sh.kaito.kaiflow.method"] == "lora"
    assert annotations["sh.kaito.kaiflow.base-model"] == "local:kaiflow-tiny-test"
    assert annotations["sh.kaito.kaiflow.dataset-digest"] == "sha256:" + "ab" * 32
    assert float(annotations["sh.kaito.kaiflow.train-loss"]) == 1.5
    assert float(annotations["sh.kaito.kaiflow.eval-loss"]) == 1.25
    assert annotations["sh.kaito.kaiflow.workspace"] == "default/tiny-tune"
    assert annotations["team"] == "nlp"

    # --also-tag latest points at the very same manifest bytes
    request = urllib.request.Request(f"{oci_registry.url}/v2/adapters/push-cli/manifests/latest",
                                     headers={"Accept": OCI_MANIFEST}, method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Docker-Content-Digest"] == digest


def test_oras_py_pulls_the_artifact_like_the_oras_cli_would(oci_registry, tune_output_dir, tmp_path):
    import oras.client

    result = push.push_adapter(push.PushConfig(str(tune_output_dir), f"{oci_registry.host}/adapters/oras-compat:v1"),
                               RegistryOptions(insecure=True))
    client = oras.client.OrasClient(hostname=oci_registry.host, insecure=True)
    files = client.pull(target=f"{oci_registry.host}/adapters/oras-compat@{result.digest}", outdir=str(tmp_path / "o"))
    assert sorted(p.split("/")[-1] for p in files) == sorted(p.name for p in tune_output_dir.iterdir())
    for name in files:
        pulled = tmp_path / "o" / name.split("/")[-1]
        assert pulled.read_bytes() == (tune_output_dir / pulled.name).read_bytes()


def test_push_with_basic_auth_from_docker_config(oci_registry_auth, tune_output_dir, tmp_path):
    config = oci_registry_auth.write_docker_config(tmp_path / "config.json")
    outputs = tmp_path / "outputs"
    code = run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image",
                                f"{oci_registry_auth.host}/adapters/authed:v1", "--insecure",
                                "--docker-config", str(config), "--outputs", str(outputs)])
    assert code == 0
    assert (outputs / "adapter-digest").read_text().startswith("sha256:")


def test_wrong_password_fails_clearly_without_leaking_it(oci_registry_auth, tune_output_dir, tmp_path, capsys):
    wrong = "not-the-password-0123"
    config = oci_registry_auth.write_docker_config(tmp_path / "config.json", password=wrong)
    outputs = tmp_path / "outputs"
    code = run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image",
                                f"{oci_registry_auth.host}/adapters/authed:v2", "--insecure",
                                "--docker-config", str(config), "--outputs", str(outputs)])
    captured = capsys.readouterr()
    assert code == 2
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error:")
    assert oci_registry_auth.host in error and "adapters/authed" in error and "401" in error
    for secret in (wrong, oci_registry_auth.password):
        assert secret not in captured.err and secret not in captured.out
    assert not outputs.exists()


def test_no_credentials_for_a_basic_auth_registry_is_a_clear_error(oci_registry_auth, tune_output_dir, tmp_path, capsys):
    code = run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image",
                                f"{oci_registry_auth.host}/adapters/authed:v3", "--insecure",
                                "--outputs", str(tmp_path / "o")])
    assert code == 2
    assert "requires a username and password" in capsys.readouterr().err


def test_registry_stopped_mid_push_is_retried_then_fails_and_tags_nothing(registry_factory, tmp_path):
    registry = registry_factory()
    adapter = make_adapter_dir(tmp_path / "adapter", weights_bytes=256 * 1024)
    pushed_layers: list[int] = []

    def stop_after_first_layer(done: int, total: int) -> None:
        pushed_layers.append(done)
        if done == 1:
            registry.stop()

    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as failure:
        push.push_adapter(push.PushConfig(str(adapter), f"{registry.host}/adapters/broken:v1"), FAST_RETRIES,
                          on_layer=stop_after_first_layer)
    assert time.monotonic() - started < 60  # it gives up (a bound for a hang, generous for a loaded machine)
    message = str(failure.value)
    assert "after 3 attempts" in message and registry.host in message and "adapter_model.safetensors" in message
    assert pushed_layers == [1]

    registry.start()  # same storage: the half-pushed blobs are there, the tag must not be
    status, _ = get_manifest(registry, "adapters/broken", "v1")
    assert status == 404


def test_unreachable_registry_exits_1_so_the_pipeline_retries(tmp_path, capsys):
    adapter = make_adapter_dir(tmp_path / "adapter")
    image = f"127.0.0.1:{free_port()}/adapters/x:v1"  # nothing listens there: connection refused
    code = run_step(push.main, ["--adapter-dir", str(adapter), "--image", image, "--insecure", "--attempts", "2",
                                "--backoff-s", "0.01", "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "after 2 attempts" in err and err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "o").exists()


def test_registry_back_within_the_retries_completes_the_push(registry_factory, tmp_path):
    registry = registry_factory()
    adapter = make_adapter_dir(tmp_path / "adapter", seed=3)
    restarter: list[threading.Thread] = []

    def bounce(done: int, total: int) -> None:
        if done == 2:
            registry.stop()
            thread = threading.Timer(0.3, registry.start)
            thread.start()
            restarter.append(thread)

    options = RegistryOptions(insecure=True, attempts=6, backoff_s=0.1, timeout_s=5)
    result = push.push_adapter(push.PushConfig(str(adapter), f"{registry.host}/adapters/bounced:v1"), options,
                               on_layer=bounce)
    restarter[0].join()
    status, manifest = get_manifest(registry, "adapters/bounced", "v1")
    assert status == 200 and len(manifest["layers"]) == 5
    assert result.digest.startswith("sha256:")


@pytest.mark.parametrize(("args", "expected"), [
    (["--image", "127.0.0.1:9/adapters/x:v1"], "adapter_config.json is missing"),
    (["--image", "127.0.0.1:9/adapters//x:v1"], "path component ''"),
    (["--image", "127.0.0.1:9/Adapters/X:v1"], "--image: '127.0.0.1:9/Adapters/X:v1' is not an OCI image reference"),
    (["--image", "127.0.0.1:9/adapters/x"], "has no tag"),
    (["--image", "127.0.0.1:9/adapters/x:v1", "--annotation", "novalue"], "--annotation: expected KEY=VALUE, got 'novalue'"),
    (["--image", "127.0.0.1:9/adapters/x:v1", "--also-tag", "bad tag"], "--also-tag 'bad tag'"),
])
def test_bad_input_is_one_line_exit_2(args, expected, tmp_path, capsys):
    adapter = make_adapter_dir(tmp_path / "adapter")
    if expected.startswith("adapter_config"):
        (adapter / "adapter_config.json").unlink()
    code = run_step(push.main, ["--adapter-dir", str(adapter), *args, "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_same_files_same_auto_tag_suffix(tmp_path):
    import datetime as dt

    from stepkit.oci import ImageRef, file_descriptor

    first = make_adapter_dir(tmp_path / "a")
    second = make_adapter_dir(tmp_path / "b")
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    image = ImageRef.parse("127.0.0.1:1/adapters/x")

    def layers(directory):
        return [file_descriptor(p, "x", p.name) for p in push.collect_files(directory)]

    assert push.resolve_tag(image, "auto", layers(first), now) == push.resolve_tag(image, "auto", layers(second), now)
    (second / "loss.json").write_text("[]")
    assert push.resolve_tag(image, "auto", layers(first), now) != push.resolve_tag(image, "auto", layers(second), now)
    assert push.resolve_tag(image, "auto", layers(first), now).startswith("20260102T030405Z-")


def test_bearer_token_registry_push_and_pull(oci_registry_token, tune_output_dir, tmp_path, capsys):
    """ACR/GHCR-style auth: Basic credentials buy scoped JWTs from the realm; a push needs a push scope."""
    from steps import pull_adapters as pull

    config = oci_registry_token.write_docker_config(tmp_path / "config.json")
    image = f"{oci_registry_token.host}/adapters/bearer:v1"
    options = RegistryOptions(insecure=True, docker_config=str(config), attempts=2, backoff_s=0.05)
    result = push.push_adapter(push.PushConfig(str(tune_output_dir), image), options)
    issued = oci_registry_token.token_server.issued
    assert any("push" in scope for scopes in issued for scope in scopes), issued

    pulled = pull.pull_adapters(pull.PullConfig([f"b={image}"], str(tmp_path / "dest")), options)
    assert pulled[0].digest == result.digest
    for path in tune_output_dir.iterdir():
        assert (tmp_path / "dest" / "b" / path.name).read_bytes() == path.read_bytes()

    bad = oci_registry_token.write_docker_config(tmp_path / "bad.json", password="bearer-wrong-pw")
    code = run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image", image, "--insecure",
                                "--docker-config", str(bad), "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "401" in err and oci_registry_token.host in err and "bearer-wrong-pw" not in err


def test_the_training_log_and_loss_curve_travel_inside_the_adapter(oci_registry, tune_output_dir, tmp_path,
                                                                    monkeypatch):
    """The tune step's log (KAIFLOW_STEP_LOG, kept across retries) is pushed beside loss.png (--attach)."""
    import logging
    import subprocess
    import sys

    from stepkit.common import STEP_LOG_ENV

    log_file = tmp_path / "data" / "logs" / "tune.log"
    # a step run with the variable set writes its log and its failure line there, appending
    script = ("import logging, sys; from stepkit.common import run_step, StepError\n"
              "def main(argv):\n    logging.getLogger('kaiflow.steps.tune').info('epoch 1: loss 2.5')\n"
              "    raise StepError('dataset row 3: no messages')\n"
              "sys.exit(run_step(main))")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, STEP_LOG_ENV: str(log_file)},
                              capture_output=True, text=True)
        assert done.returncode == 2
    text = log_file.read_text()
    assert text.count("epoch 1: loss 2.5") == 2 and text.count("error: dataset row 3: no messages") == 2
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if not isinstance(h, logging.FileHandler)]

    outputs = tmp_path / "outputs"
    image = f"{oci_registry.host}/adapters/with-log:v1"
    assert run_step(push.main, ["--adapter-dir", str(tune_output_dir), "--image", image, "--insecure",
                                "--attach", str(log_file), "--attach", str(tmp_path / "absent.log"),
                                "--outputs", str(outputs)]) == 0
    _, manifest = get_manifest(oci_registry, "adapters/with-log", "v1")
    titles = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in manifest["layers"]}
    assert titles["tune.log"] == "text/plain" and titles["loss.png"] == "image/png"
    assert "absent.log" not in titles
