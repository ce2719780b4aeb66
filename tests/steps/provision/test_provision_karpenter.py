"""The `karpenter` provider: NodeClaims against the emulated API, with Karpenter simulated by the fixture."""

from __future__ import annotations

import json
import re

import pytest

from stepkit.common import run_step
from steps.provision import release
from steps.provision.__main__ import main
from steps.provision.base import pool_safe_name

CLAIMS = "/apis/karpenter.sh/v1/nodeclaims"
SKU = "Standard_NC24ads_A100_v4"


def argv(kube, outputs, *extra: str) -> list[str]:
    return ["--provider", "karpenter", "--workspace-name", "phi-3", "--namespace", "team-a", "--instance-type", SKU,
            "--label", "apps=phi-3", "--kubeconfig", str(kube.kubeconfig), "--outputs", str(outputs),
            "--poll-interval", "0.05", "--timeout", "10", *extra]


def test_creates_nodeclaims_like_kaito_and_reports_the_nodes(kube, tmp_path):
    with kube.simulate_karpenter(delay=0.2) as handled:
        assert run_step(main, argv(kube, tmp_path, "--count", "2")) == 0
    names = [pool_safe_name("phi-3", "team-a", i) for i in range(2)]
    assert sorted(handled) == names
    nodes = json.loads((tmp_path / "nodes").read_text())
    assert nodes == [f"aks-{n}-vmss000000" for n in names]
    assert (tmp_path / "provider").read_text() == "karpenter"

    claim = kube.get(f"{CLAIMS}/{names[0]}")
    assert claim["metadata"]["labels"] == {
        "apps": "phi-3", "kaito.sh/workspace": "phi-3", "kaito.sh/workspacenamespace": "team-a", "karpenter.sh/nodepool": "kaito",
        "app.kubernetes.io/managed-by": "kaiflow",
    }
    assert claim["metadata"]["annotations"]["kaiflow.kaito.sh/owner"] == "kaito.sh/Workspace/team-a/phi-3"
    requirements = {r["key"]: r["values"] for r in claim["spec"]["requirements"]}
    assert requirements["node.kubernetes.io/instance-type"] == [SKU]
    assert requirements["apps"] == ["phi-3"] and requirements["kubernetes.io/os"] == ["linux"]
    assert claim["spec"]["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    assert claim["spec"]["nodeClassRef"] == {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"}
    node = kube.get(f"/api/v1/nodes/{nodes[0]}")
    assert node["metadata"]["labels"]["apps"] == "phi-3"


def test_rerun_reuses_the_claims(kube, tmp_path):
    with kube.simulate_karpenter():
        assert run_step(main, argv(kube, tmp_path / "first")) == 0
        assert run_step(main, argv(kube, tmp_path / "second")) == 0
    assert len(kube.list(CLAIMS)) == 1
    assert (tmp_path / "first" / "nodes").read_text() == (tmp_path / "second" / "nodes").read_text()


def test_existing_claim_with_another_size_is_refused(kube, tmp_path, capsys):
    with kube.simulate_karpenter():
        assert run_step(main, argv(kube, tmp_path)) == 0
    assert run_step(main, argv(kube, tmp_path, "--instance-type", "Standard_NC6s_v3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --instance-type: NodeClaim") and SKU in err


def test_launch_failure_fails_the_step_and_removes_the_claim(kube, tmp_path, capsys):
    with kube.simulate_karpenter(fail_reason="InsufficientCapacity"):
        assert run_step(main, argv(kube, tmp_path)) == 1, "no capacity may pass: retried by the pipeline"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "failed to launch" in err and "InsufficientCapacity" in err
    assert kube.list(CLAIMS) == [], "a retry must start from a fresh claim"


def test_times_out_when_nothing_launches(kube, tmp_path, capsys):
    assert run_step(main, argv(kube, tmp_path, "--timeout", "0.3")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "timed out after 0.3 s" in err and "waiting for Launched, Registered, Initialized, Ready" in err


def test_ready_preferred_nodes_count_towards_the_total(kube, tmp_path):
    kube.add_node("gpu-old", labels={"apps": "phi-3"})
    with kube.simulate_karpenter() as handled:
        assert run_step(main, argv(kube, tmp_path, "--count", "2", "--preferred-node", "gpu-old")) == 0
    assert handled == [pool_safe_name("phi-3", "team-a", 0)]
    assert json.loads((tmp_path / "nodes").read_text())[0] == "gpu-old"


def test_missing_nodeclaim_crd_names_karpenter(kube, tmp_path, capsys):
    del kube.emulator.resources["karpenter.sh/v1/nodeclaims"]
    assert run_step(main, argv(kube, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "applying NodeClaim" in err and "HTTP 404" in err and "Karpenter" in err


# -- name clashes (issue 17, High 1) ------------------------------------------------------------


def _foreign_claim(name: str, owner: str | None) -> dict:
    annotations = {"kaiflow.kaito.sh/owner": owner} if owner else {}
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim",
            "metadata": {"name": name, "labels": {"kaito.sh/workspace": "other", "kaito.sh/workspacenamespace": "team-b"},
                         "annotations": annotations},
            "spec": {"requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [SKU]}],
                     "nodeClassRef": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "default"}}}


@pytest.mark.parametrize("owner", ["kaito.sh/Workspace/team-b/other", None], ids=["another-workspace", "kaitos-own"])
def test_a_clashing_claim_of_another_owner_is_never_adopted_nor_released(kube, tmp_path, capsys, owner):
    """A crafted clash: a claim with the name phi-3's would get, made for another Workspace (or by
    Kaito, without kaiflow's owner mark). Provision exits 2 naming both and leaves it as it was;
    phi-3's release does not delete it."""
    name = pool_safe_name("phi-3", "team-a", 0)
    kube.create(CLAIMS, _foreign_claim(name, owner))
    before = kube.get(f"{CLAIMS}/{name}")
    assert run_step(main, argv(kube, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --workspace-name: NodeClaim {name} belongs to ")
    assert (owner or "no owner annotation") in err and "kaito.sh/Workspace/team-a/phi-3" in err and "clash" in err
    after = kube.get(f"{CLAIMS}/{name}")
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert release("karpenter", "phi-3", "team-a", kubeconfig=str(kube.kubeconfig), timeout=2) == []
    assert kube.get(f"{CLAIMS}/{name}")["metadata"]["name"] == name


def test_names_use_every_character_the_pool_limit_allows_for_the_hash():
    """20,000 Workspaces with a shared prefix in one namespace: no two share a pool or claim name
    (with the old 6 readable characters + 16 bits of hash, clashes were certain at this count)."""
    workspaces = [f"phi-3-tuning-{i:05d}" for i in range(20_000)]
    pools = {pool_safe_name(w, "team-a") for w in workspaces}
    claims = {pool_safe_name(w, "team-a", 0) for w in workspaces}
    assert len(pools) == len(claims) == len(workspaces)
    assert all(re.fullmatch(r"[a-z][a-z0-9]{11}", p) for p in pools)
    assert max(len(pool_safe_name(w, "team-a", 99)) for w in workspaces[:100]) == 12


# -- the operator requests, the task waits (issue 17, Medium 5) ---------------------------------


def test_wait_only_creates_nothing_and_reports_what_the_operator_requested(kube, tmp_path, capsys):
    from steps.provision.release import request

    assert run_step(main, argv(kube, tmp_path / "early", "--wait-only", "--timeout", "0.3")) == 1
    assert "not requested yet (the kaiflow operator creates it)" in capsys.readouterr().err
    assert kube.list(CLAIMS) == [], "--wait-only never creates a claim"
    args = argv(kube, tmp_path / "req")[:-6]  # the task's command line, without the test's waits
    assert request(args, kubeconfig=str(kube.kubeconfig)) == [pool_safe_name("phi-3", "team-a", 0)]
    with kube.simulate_karpenter():
        assert run_step(main, argv(kube, tmp_path / "ok", "--wait-only")) == 0
    assert json.loads((tmp_path / "ok" / "nodes").read_text()) == [f"aks-{pool_safe_name('phi-3', 'team-a', 0)}-vmss000000"]


def test_a_claim_that_failed_to_launch_is_kept_by_the_waiting_task_and_renewed_by_the_operator(kube, tmp_path, capsys):
    from steps.provision.release import request

    name = pool_safe_name("phi-3", "team-a", 0)
    args = argv(kube, tmp_path / "req")[:-6]
    request(args, kubeconfig=str(kube.kubeconfig))
    with kube.simulate_karpenter(fail_reason="InsufficientCapacity"):
        assert run_step(main, argv(kube, tmp_path, "--wait-only")) == 1
    assert "InsufficientCapacity" in capsys.readouterr().err
    assert [c["metadata"]["name"] for c in kube.list(CLAIMS)] == [name], "the task may not delete it"
    request(args, kubeconfig=str(kube.kubeconfig))  # the operator's next request deletes the failed claim
    assert kube.list(CLAIMS) == []
    request(args, kubeconfig=str(kube.kubeconfig))  # ... and the one after makes it afresh
    assert [c["metadata"]["name"] for c in kube.list(CLAIMS)] == [name]
