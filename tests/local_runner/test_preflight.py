"""`kaiflow run` checks what the DAG needs outside itself before the first task (local_runner.preflight)."""

import io
from collections import namedtuple
from pathlib import Path

import pytest
from rich.console import Console

from kaiflow.cli import main
from local_runner import preflight
from local_runner.console import run_cli
from local_runner.local_registry import free_port, registry_answers
from local_runner.preflight import PreflightError, check
from local_runner.runner import local_manifest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "local_tuning_tiny.yaml"
TINY_CONFIG = str(ROOT / "examples" / "configs" / "tiny_training_config.yaml")


def _workspace(tmp_path: Path, url: str, image: str, config: str = TINY_CONFIG) -> Path:
    path = tmp_path / "ws.yaml"
    path.write_text(
        "apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: checked}\n"
        "resource: {labelSelector: {matchLabels: {a: b}}}\n"
        f"tuning:\n  preset: {{name: kaiflow-tiny-test}}\n  method: lora\n  input: {{urls: ['{url}']}}\n"
        f"  config: {config}\n"
        f"  output: {{image: '{image}'}}\n"
    )
    return path


def test_missing_dataset_and_registry_are_refused_before_any_task(tmp_path):
    port = free_port()
    workspace = _workspace(tmp_path, "file:no/such/data.parquet", f"127.0.0.1:{port}/x/y:v1", config="no-such.yaml")
    out = io.StringIO()
    assert run_cli(workspace, tmp_path / "work", console=Console(file=out, width=300)) == 2
    text = out.getvalue()
    assert "before the first task" in text
    assert f"registry 127.0.0.1:{port}: nothing answers there; start one with `kaiflow registry --port {port}`" in text
    assert "no/such/data.parquet" in text and "-p dataset-url=" in text
    assert f"training config {tmp_path / 'no-such.yaml'}: no such file" in text
    assert not (tmp_path / "work" / "logs").exists() and not (tmp_path / "work" / "state.json").exists()


def test_parameters_are_checked_as_the_run_would_use_them(tmp_path, capsys):
    port = free_port()
    code = main(["run", "-f", str(TINY), "--workdir", str(tmp_path / "work"),
                 "-p", f"output-image=127.0.0.1:{port}/kaiflow/x:v1"])
    assert code == 2
    assert f"kaiflow registry --port {port}" in capsys.readouterr().err


def test_the_local_default_registry_is_started_for_the_run(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setattr(preflight, "DEFAULT_PORT", port)
    monkeypatch.setattr(preflight, "REGISTRY_ROOT", tmp_path / "registry")
    workspace = _workspace(tmp_path, (ROOT / "examples" / "data" / "demo_chat.parquet").as_uri(),
                           f"127.0.0.1:{port}/x/y:v1")
    found = check(local_manifest(workspace, tmp_path / "work"), tmp_path / "work")
    try:
        assert found.started is not None and registry_answers(f"127.0.0.1:{port}")
        assert any("started" in r for r in found.registries)
        assert found.datasets and found.disk_needed is not None
    finally:
        found.stop()
    assert not registry_answers(f"127.0.0.1:{port}")


def test_too_little_disk_is_refused(tmp_path, monkeypatch, oci_registry):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _path: usage(10, 10, 1024))
    workspace = _workspace(tmp_path, (ROOT / "examples" / "data" / "demo_chat.parquet").as_uri(),
                           f"{oci_registry.host}/x/y:v1")
    with pytest.raises(PreflightError, match="disk: 0.0 GiB free under .* free space or use another --workdir"):
        check(local_manifest(workspace, tmp_path / "work"), tmp_path / "work")
