"""`kaiflow controller` options: flags, environment defaults (the Deployment's way), checks."""

import pytest

from controller.options import ControllerOptions, parse


def test_defaults_are_the_cluster():
    assert parse([]) == ControllerOptions()


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("KAIFLOW_CONTROLLER_DELETE_DEADLINE_S", "30")
    monkeypatch.setenv("KAIFLOW_CONTROLLER_PROVIDER", "karpenter")
    options = parse(["--opt-in", "--namespace", "a", "--namespace", "b", "--workflow-ttl-s", "600",
                     "--no-release-after-failure", "--insecure-registry", "reg:5000"])
    assert options.delete_deadline_s == 30.0 and options.provider == "karpenter"
    assert options.opt_in and options.namespace == ("a", "b") and not options.watches_all_namespaces
    assert options.workflow_ttl_s == 600 and options.release_after_failure is False
    assert options.insecure_registry == ("reg:5000",)


def test_local_target_needs_a_root(capsys):
    with pytest.raises(SystemExit):
        parse(["--target", "local"])
    assert "--local-root is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--target", "elsewhere"])


def test_kaiflow_controller_is_the_operator():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "kaiflow.cli", "controller", "--help"], capture_output=True,
                         text=True, env=env, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: kaiflow controller" in out.stdout and "--opt-in" in out.stdout
