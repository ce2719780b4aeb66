"""The `existing` provider against the emulated Kubernetes API (tests/fixtures/kube.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from stepkit.common import run_step
from steps.provision.__main__ import main

REPO = Path(__file__).resolve().parents[3]


def argv(kube, outputs, *extra: str) -> list[str]:
    return ["--provider", "existing", "--workspace-name", "ws", "--namespace", "default", "--kubeconfig",
            str(kube.kubeconfig), "--outputs", str(outputs), "--poll-interval", "0.05", *extra]


def test_waits_until_enough_matching_nodes_are_ready_preferred_first(kube, tmp_path):
    kube.add_node("gpu-b", labels={"apps": "phi3"})
    kube.add_node("gpu-a", labels={"apps": "phi3"}, ready=False)
    kube.add_node("cpu-1", labels={"apps": "other"})

    def kubelet() -> None:
        time.sleep(0.3)
        kube.set_node_ready("gpu-a")

    thread = threading.Thread(target=kubelet)
    thread.start()
    rc = run_step(main, argv(kube, tmp_path, "--count", "2", "--label", "apps=phi3", "--preferred-node", "gpu-a",
                             "--timeout", "10"))
    thread.join()
    assert rc == 0
    # gpu-a was not ready when the step started and the step takes only ready nodes: choosing it
    # shows the step waited for it (no clock needed)
    assert json.loads((tmp_path / "nodes").read_text()) == ["gpu-a", "gpu-b"]
    assert (tmp_path / "provider").read_text() == "existing"


def test_times_out_naming_what_is_missing(kube, tmp_path, capsys):
    kube.add_node("gpu-a", labels={"apps": "phi3"}, ready=False)
    rc = run_step(main, argv(kube, tmp_path, "--count", "2", "--label", "apps=phi3", "--timeout", "0.3"))
    assert rc == 1, "a timeout may pass: exit 1 lets the pipeline retry"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "timed out after 0.3 s" in err and "0 of 2 Ready nodes matching apps=phi3" in err and "gpu-a" in err


def test_needs_labels_or_preferred_nodes(kube, tmp_path, capsys):
    assert run_step(main, argv(kube, tmp_path)) == 2
    assert "--label" in capsys.readouterr().err


def test_preferred_nodes_alone_and_kubeconfig_from_the_environment(kube, tmp_path):
    kube.add_node("node-1")
    kube.add_node("node-2")
    proc = subprocess.run(
        [sys.executable, "-m", "steps.provision", "--provider", "existing", "--workspace-name", "ws",
         "--namespace", "default", "--preferred-node", "node-2", "--outputs", str(tmp_path), "--timeout", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, **kube.env},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "nodes").read_text()) == ["node-2"]


def test_unreachable_api_is_a_clear_error(tmp_path, capsys):
    kubeconfig = tmp_path / "missing-kubeconfig"
    rc = run_step(main, ["--provider", "existing", "--workspace-name", "ws", "--namespace", "default", "--label", "a=b",
                         "--kubeconfig", str(kubeconfig), "--outputs", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --kubeconfig: cannot load Kubernetes credentials")
