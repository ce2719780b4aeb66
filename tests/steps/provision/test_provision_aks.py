"""The `aks` provider: the Azure SDK against a local HTTPS ARM endpoint (tests/fixtures/azure_arm.py)."""

from __future__ import annotations

import json

import pytest

from stepkit.common import StepError, run_step
from steps.provision import release
from steps.provision.__main__ import main
from steps.provision.base import pool_safe_name

SKU = "Standard_NC24ads_A100_v4"
POOL = pool_safe_name("phi-3", "team-a")


@pytest.fixture
def arm(azure_arm, monkeypatch):
    azure_arm.apply_env(monkeypatch)
    azure_arm.polls_until_done = 2
    return azure_arm


def argv(arm, outputs, *extra: str) -> list[str]:
    return ["--provider", "aks", "--workspace-name", "phi-3", "--namespace", "team-a", "--instance-type", SKU,
            "--label", "apps=phi-3", "--outputs", str(outputs), "--poll-interval", "0.05", "--timeout", "20",
            *arm.cli_args, *extra]


def test_creates_the_agent_pool_and_waits_for_its_nodes(arm, kube, tmp_path):
    def aks_adds_nodes(pool_name: str, pool: dict) -> None:
        for i in range(pool["properties"]["count"]):
            kube.add_node(f"aks-{pool_name}-12345678-vmss00000{i}",
                          labels={"agentpool": pool_name, **pool["properties"]["nodeLabels"]},
                          taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}])

    arm.on_provisioned = aks_adds_nodes
    arm.transient_failures = 1  # the first PUT answers 503: azure-core retries it
    rc = run_step(main, argv(arm, tmp_path, "--count", "2", "--kubeconfig", str(kube.kubeconfig)))
    assert rc == 0
    assert json.loads((tmp_path / "nodes").read_text()) == [f"aks-{POOL}-12345678-vmss00000{i}" for i in range(2)]
    assert (tmp_path / "provider").read_text() == "aks"

    props = arm.pools[POOL]["properties"]
    assert props["provisioningState"] == "Succeeded"
    assert (props["vmSize"], props["count"], props["mode"], props["osType"]) == (SKU, 2, "User", "Linux")
    assert props["nodeTaints"] == ["sku=gpu:NoSchedule"]
    assert props["nodeLabels"] == {"apps": "phi-3", "kaito.sh/workspace": "phi-3", "kaito.sh/workspacenamespace": "team-a"}
    assert all(authorized for _, _, authorized in arm.requests), "every ARM call carries the managed-identity token"
    assert [m for m, _, _ in arm.requests].count("PUT") == 2


def test_rerun_is_idempotent_without_waiting_for_nodes(arm, tmp_path):
    assert run_step(main, argv(arm, tmp_path / "a", "--no-wait-for-nodes")) == 0
    assert run_step(main, argv(arm, tmp_path / "b", "--no-wait-for-nodes")) == 0
    assert list(arm.pools) == [POOL]
    assert json.loads((tmp_path / "b" / "nodes").read_text()) == []


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [("QuotaExceeded", 2), ("AllocationFailed", 1)],  # a person must raise the quota; capacity may come back
)
def test_failed_provisioning_reports_the_arm_error(arm, tmp_path, capsys, code, exit_code):
    arm.fail_vm_sizes[SKU] = (code, "Operation could not be completed.")
    assert run_step(main, argv(arm, tmp_path, "--no-wait-for-nodes")) == exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: agent pool {POOL} in kaiflow-rg/kaiflow-aks") and code in err


def test_changing_the_vm_size_names_the_instance_type(arm, tmp_path, capsys):
    assert run_step(main, argv(arm, tmp_path, "--no-wait-for-nodes")) == 0
    assert run_step(main, argv(arm, tmp_path, "--no-wait-for-nodes", "--instance-type", "Standard_NC6s_v3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(--instance-type)" in err and "PropertyChangeNotAllowed" in err


def test_unknown_cluster_names_the_fields(arm, tmp_path, capsys):
    assert run_step(main, argv(arm, tmp_path, "--cluster-name", "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --cluster-name/--resource-group/--subscription-id: AKS cluster kaiflow-rg/nope not found")


@pytest.mark.parametrize(
    ("extra", "unset", "message"),
    [
        ((), "AZURE_SUBSCRIPTION_ID", "--subscription-id (or $AZURE_SUBSCRIPTION_ID) is required"),
        (("--subscription-id", "not-a-guid"), None, "--subscription-id: 'not-a-guid' is not a subscription GUID"),
        (("--pool-name", "Bad-Pool"), None, "--pool-name: 'Bad-Pool' must be 1-12 lowercase"),
        (("--arm-endpoint", "http://127.0.0.1:1"), None, "--arm-endpoint: 'http://127.0.0.1:1' must be an https:// URL"),
    ],
)
def test_bad_settings_are_named(arm, tmp_path, capsys, monkeypatch, extra, unset, message):
    if unset:
        monkeypatch.delenv(unset)
    assert run_step(main, argv(arm, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert arm.requests == [], "nothing is sent before the settings are valid"


def test_no_credential_is_a_clear_error(arm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IDENTITY_HEADER", "wrong")
    assert run_step(main, argv(arm, tmp_path, "--no-wait-for-nodes")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: Azure credentials:")
    assert arm._token not in err


def test_a_clashing_pool_of_another_workspace_is_never_rewritten_nor_released(arm, tmp_path, capsys):
    """A crafted clash (issue 17, High 1): team-b/other's pool has the name phi-3's would get. The
    provision step reads it first, exits 2 naming both and leaves count, labels and owner tag as
    they were; phi-3's release refuses it too."""
    other = ["--provider", "aks", "--workspace-name", "other", "--namespace", "team-b", "--instance-type", SKU,
             "--pool-name", POOL, "--outputs", str(tmp_path / "other"), "--poll-interval", "0.05", "--timeout", "20",
             "--no-wait-for-nodes", *arm.cli_args]
    assert run_step(main, other) == 0
    before = json.loads(json.dumps(arm.pools[POOL]["properties"]))
    capsys.readouterr()
    assert run_step(main, argv(arm, tmp_path, "--count", "3", "--no-wait-for-nodes")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --pool-name: agent pool {POOL} in kaiflow-rg/kaiflow-aks belongs to "
                          "kaito.sh/Workspace/team-b/other, not to kaito.sh/Workspace/team-a/phi-3")
    props = arm.pools[POOL]["properties"]
    assert (props["count"], props["nodeLabels"], props["tags"]) == (before["count"], before["nodeLabels"], before["tags"])
    options = {"arm_endpoint": arm.url, "ca_bundle": str(arm.ca_bundle)}
    with pytest.raises(StepError, match="is not the one kaiflow made for kaito.sh/Workspace/team-a/phi-3"):
        release("aks", "phi-3", "team-a", options=options, timeout=20)
    assert POOL in arm.pools
