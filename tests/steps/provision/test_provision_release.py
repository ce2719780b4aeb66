"""Releasing what provision made (``steps.provision.release`` / ``--delete``), against the same fakes."""

from __future__ import annotations

import json
import time

import pytest

from stepkit.common import RetryableError, StepError, run_step
from steps.provision import release
from steps.provision.__main__ import main
from steps.provision.base import pool_safe_name

CLAIMS = "/apis/karpenter.sh/v1/nodeclaims"
SKU = "Standard_NC24ads_A100_v4"


def provision_argv(provider, outputs, *extra):
    return ["--provider", provider, "--workspace-name", "phi-3", "--namespace", "team-a", "--instance-type", SKU,
            "--outputs", str(outputs), "--poll-interval", "0.05", "--timeout", "10", *extra]


def test_karpenter_release_deletes_only_the_workspaces_claims(kube, tmp_path):
    with kube.simulate_karpenter():
        assert run_step(main, provision_argv("karpenter", tmp_path / "a", "--count", "2",
                                             "--kubeconfig", str(kube.kubeconfig))) == 0
    # Same labels, but made by someone else (Kaito's own controller): no kaiflow owner annotation.
    kube.create(CLAIMS, {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {
        "name": "kaito-made", "labels": {"kaito.sh/workspace": "phi-3", "kaito.sh/workspacenamespace": "team-a"}}})
    # Another Workspace's claim.
    kube.create(CLAIMS, {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {
        "name": "other", "labels": {"kaito.sh/workspace": "other", "kaito.sh/workspacenamespace": "team-a"},
        "annotations": {"kaiflow.kaito.sh/owner": "kaito.sh/Workspace/team-a/other"}}})
    released = release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=10)
    assert released == [pool_safe_name("phi-3", "team-a", i) for i in range(2)]
    assert sorted(c["metadata"]["name"] for c in kube.list(CLAIMS)) == ["kaito-made", "other"]
    # idempotent: nothing left to release is fine
    assert release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=10) == []


def test_karpenter_release_waits_for_the_finalizer_under_a_deadline(kube):
    owner = {"kaiflow.kaito.sh/owner": "kaito.sh/Workspace/team-a/phi-3"}
    labels = {"kaito.sh/workspace": "phi-3", "kaito.sh/workspacenamespace": "team-a"}
    kube.create(CLAIMS, {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {
        "name": "held", "labels": labels, "annotations": owner, "finalizers": ["karpenter.sh/termination"]}})
    started = time.monotonic()
    with pytest.raises(RetryableError, match=r"timed out after 0.5 s waiting for NodeClaims held to be deleted"):
        release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=0.5)
    assert time.monotonic() - started < 60  # it gives up (a bound for a hang, generous for a loaded machine)
    assert kube.get(f"{CLAIMS}/held")["metadata"]["deletionTimestamp"]

    def karpenter_drains() -> None:
        held = [c for c in kube.list(CLAIMS) if c["metadata"]["name"] == "held"]
        if held and held[0]["metadata"].get("deletionTimestamp"):
            kube.patch(f"{CLAIMS}/held", {"metadata": {"finalizers": None}})

    with kube.controller(karpenter_drains):
        assert release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=10) == ["held"]
    assert kube.list(CLAIMS) == []


def test_release_without_the_nodeclaim_crd_releases_nothing(kube):
    del kube.emulator.resources["karpenter.sh/v1/nodeclaims"]
    assert release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=5) == []


def test_local_and_existing_release_nothing(kube):
    assert release("local", "phi-3", "team-a") == []
    assert release("existing", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig)) == []


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (("gcp", "phi-3", "team-a"), {}, "--provider: 'gcp'"),
    (("karpenter", "Bad_Name", "team-a"), {}, "--workspace-name"),
    (("karpenter", "phi-3", "team-a"), {"options": {"flavour": "x"}}, "options: flavour not known to provider karpenter"),
    (("local", "phi-3", "team-a"), {"options": {"x": 1}}, "options: provider local takes none"),
])
def test_release_bad_input_names_the_field(args, kwargs, message):
    with pytest.raises(StepError, match=message) as error:
        release(*args, **kwargs)
    assert not isinstance(error.value, RetryableError)


def test_delete_cli_writes_what_it_released(kube, tmp_path, capsys):
    with kube.simulate_karpenter():
        assert run_step(main, provision_argv("karpenter", tmp_path / "a", "--kubeconfig", str(kube.kubeconfig))) == 0
    argv = ["--delete", "--provider", "karpenter", "--workspace-name", "phi-3", "--namespace", "team-a",
            "--kubeconfig", str(kube.kubeconfig), "--poll-interval", "0.05", "--timeout", "10"]
    assert run_step(main, [*argv, "--outputs", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "released").read_text()) == [pool_safe_name("phi-3", "team-a", 0)]
    assert run_step(main, [*argv, "--outputs", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "released").read_text()) == []


# ---------------------------------------------------------------------------- aks


@pytest.fixture
def arm(azure_arm, monkeypatch):
    azure_arm.apply_env(monkeypatch)
    azure_arm.polls_until_done = 2
    return azure_arm


def test_aks_release_deletes_the_pool_and_is_idempotent(arm, tmp_path):
    assert run_step(main, provision_argv("aks", tmp_path, "--no-wait-for-nodes", *arm.cli_args)) == 0
    pool = pool_safe_name("phi-3", "team-a")
    assert list(arm.pools) == [pool]
    options = {"arm_endpoint": arm.url, "ca_bundle": str(arm.ca_bundle)}  # subscription etc. from the environment
    assert release("aks", "phi-3", "team-a", options=options, timeout=20) == [pool]
    assert arm.pools == {}
    assert ("DELETE", arm.pool_path(pool), True) in arm.requests
    assert release("aks", "phi-3", "team-a", options=options, timeout=20) == []


def test_aks_release_refuses_a_pool_kaiflow_did_not_make_for_the_workspace(arm, tmp_path):
    assert run_step(main, provision_argv("aks", tmp_path, "--no-wait-for-nodes", *arm.cli_args)) == 0
    pool = pool_safe_name("phi-3", "team-a")
    arm.pools[pool]["properties"]["tags"] = {"team": "gpu-admins"}
    options = {"arm_endpoint": arm.url, "ca_bundle": str(arm.ca_bundle)}
    with pytest.raises(StepError, match=f"--pool-name: agent pool {pool} .* is not the one kaiflow made"):
        release("aks", "phi-3", "team-a", options=options, timeout=20)
    assert pool in arm.pools


def test_aks_delete_cli_with_an_unknown_cluster_is_exit_2(arm, tmp_path, capsys):
    argv = ["--delete", "--provider", "aks", "--workspace-name", "phi-3", "--namespace", "team-a",
            "--cluster-name", "nope", "--outputs", str(tmp_path), *arm.cli_args]
    assert run_step(main, argv) == 2
    assert "AKS cluster kaiflow-rg/nope not found" in capsys.readouterr().err


def test_delete_from_the_command_line_as_an_onexit_handler_runs_it(kube, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    with kube.simulate_karpenter():
        assert run_step(main, provision_argv("karpenter", tmp_path / "a", "--kubeconfig", str(kube.kubeconfig))) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "steps.provision", "--delete", "--provider", "karpenter", "--workspace-name", "phi-3",
         "--namespace", "team-a", "--poll-interval", "0.05", "--outputs", str(tmp_path / "b")],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=60,
        env={**os.environ, **kube.env},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "provider": "karpenter", "released": [pool_safe_name("phi-3", "team-a", 0)]}
    assert kube.list(CLAIMS) == []
