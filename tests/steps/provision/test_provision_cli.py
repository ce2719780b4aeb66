"""The step's command line: outputs, error policy, names (steps/provision/__main__.py, base.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stepkit.common import StepError, run_step
from steps.provision.__main__ import main
from steps.provision.base import ProvisionConfig, pool_safe_name

REPO = Path(__file__).resolve().parents[3]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steps.provision", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_local_provider_reports_this_host(tmp_path):
    proc = run_cli("--provider", "local", "--workspace-name", "demo", "--namespace", "default",
                   "--instance-type", "Standard_NC6s_v3", "--count", "1", "--label", "apps=demo",
                   "--outputs", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "nodes").read_text()) == [socket.gethostname()]
    assert (tmp_path / "provider").read_text() == "local"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    host = report["details"]["host"]
    assert host["cpus"] >= 1 and host["memory_gib"] > 0 and isinstance(host["gpus"], list)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--workspace-name", "Bad_Name"], "--workspace-name"),
        (["--namespace", "Team_A"], "--namespace"),
        (["--count", "0"], "--count"),
        (["--label", "novalue"], "--label"),
        (["--label", "apps=bad value"], "--label"),
        (["--preferred-node", "UPPER"], "--preferred-node"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys, args, field):
    argv = ["--provider", "local", "--workspace-name", "ws", "--namespace", "default", "--outputs", str(tmp_path)]
    assert run_step(main, argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {field}"), err
    assert not (tmp_path / "nodes").exists()


def test_bad_input_exits_2_without_traceback_from_the_command_line(tmp_path):
    proc = run_cli("--provider", "karpenter", "--workspace-name", "ws", "--namespace", "default", "--outputs", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --instance-type is required for provider karpenter (the VM size each NodeClaim asks for)"
    )


def test_unknown_provider_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--provider", "gcp", "--workspace-name", "ws", "--namespace", "default"])
    assert exc.value.code == 2
    assert "--provider" in capsys.readouterr().err


def test_short_names_are_valid_stable_aks_pool_names():
    names = {pool_safe_name(ws, ns, i) for ws in ("phi-3-tuning", "9lives", "a" * 60, "x") for ns in ("default", "team-a")
             for i in (None, 0, 99)}
    assert len(names) == 4 * 2 * 3
    assert all(re.fullmatch(r"[a-z][a-z0-9]{0,11}", n) for n in names), names
    assert pool_safe_name("phi-3-tuning", "default") == pool_safe_name("phi-3-tuning", "default")
    # every character is hash (issue 17, High 1): the Workspace is on the labels and owner mark
    assert len(pool_safe_name("phi-3-tuning", "default")) == 12


def test_config_validation_names_the_field():
    with pytest.raises(StepError, match="--timeout"):
        ProvisionConfig(provider="local", workspace_name="ws", namespace="default", timeout=0).validate()
    with pytest.raises(StepError, match="--count: 101"):
        ProvisionConfig(provider="aks", workspace_name="ws", namespace="default", count=101).validate()


@pytest.mark.parametrize(("extra", "message"), [
    (("--workspace-name", "9lives"), "--workspace-name: '9lives' is not a valid Workspace name (a DNS-1035 label"),
    (("--workspace-name", "a" * 64), "is not a valid Workspace name"),
    (("--label", "kaito.sh/workspace=other"), "--label kaito.sh/workspace=other: kaito.sh/workspace is a label kaiflow sets"),
    (("--label", "kaiflow.kaito.sh/owner=x"), "is a label kaiflow sets"),
    (("--label", "karpenter.sh/nodepool=other"), "is a label kaiflow sets"),
])
def test_names_and_labels_that_would_break_release_are_refused_before_any_node_exists(kube, tmp_path, capsys, extra, message):
    """Issue 17, Medium 10: checked by the step itself, before a NodeClaim is created."""
    argv = ["--provider", "karpenter", "--workspace-name", "phi-3", "--namespace", "team-a", "--instance-type",
            "Standard_NC24ads_A100_v4", "--kubeconfig", str(kube.kubeconfig), "--outputs", str(tmp_path),
            "--timeout", "1", *extra]
    assert run_step(main, argv) == 2
    assert message in capsys.readouterr().err
    assert kube.list("/apis/karpenter.sh/v1/nodeclaims") == []
