"""Two replicas, one active (controller/leader.py), on the box's real API server as the operator's
own ServiceAccount (the install's Lease Role): only the Lease holder creates Workflows; SIGKILL of
the holder hands over within 30 s; no Workflow is made twice; a clean stop gives the Lease up."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import yaml

from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
HANDOVER_S = 30


def _workspace(namespace: str, name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text()) if d]
    ws = next(d for d in docs if d["kind"] == "Workspace")
    ws["metadata"].update(namespace=namespace, name=name)
    return ws


def _holder(box, name: str) -> str:
    lease = box.get("lease.coordination.k8s.io", name, "kaiflow-system") or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def _workflows(box, namespace: str, workspace: str) -> list[dict]:
    return box.list("workflows.argoproj.io", namespace=namespace, selector=f"kaito.sh/workspace={workspace}")


def test_two_replicas_one_active_handover_within_30s_and_no_workflow_twice(installed, tenant, start_controller,
                                                                           argo_agent):
    box = installed
    kubeconfig = box.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    lease = f"kaiflow-controller-{tenant}"
    args = ("--resync-s", "2", "--provider", "karpenter", "--namespace", tenant, "--verbose",
            "--leader-elect", "--lease-namespace", "kaiflow-system", "--lease-name", lease)
    first = start_controller(None, *args, kubeconfig=kubeconfig, name="replica-a")
    second = start_controller(None, *args, kubeconfig=kubeconfig, name="replica-b")
    holder = wait_until(lambda: _holder(box, lease), timeout=60, what="a replica to take the Lease",
                        detail=lambda: first.log()[-2000:] + second.log()[-2000:])
    active, standby = (first, second) if holder.endswith(f"-{first.pid}") else (second, first)
    assert holder.endswith(f"-{active.pid}"), holder

    hold = threading.Event()  # keep the runs going: provision-nodes waits
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"}), hold=hold)
    try:
        box.apply(_workspace(tenant, "leader-a"))
        wait_until(lambda: _workflows(box, tenant, "leader-a"), timeout=60, what="the active replica's Workflow",
                   detail=active.log)
        assert "waiting to lead" in standby.log() and "took Lease" not in standby.log()

        active.kill()  # SIGKILL: no goodbye, the Lease must expire
        killed = time.monotonic()
        wait_until(lambda: _holder(box, lease).endswith(f"-{standby.pid}"), timeout=HANDOVER_S,
                   what=f"the standby to take the Lease within {HANDOVER_S} s", detail=standby.log)
        box.apply(_workspace(tenant, "leader-b"))
        wait_until(lambda: _workflows(box, tenant, "leader-b"), timeout=HANDOVER_S, what="the new leader's Workflow",
                   detail=standby.log)
        handover = time.monotonic() - killed
        assert handover <= HANDOVER_S + 5, handover  # Lease taken (<= 30 s, waited above) and the operator working
        standby.wait_resyncs(tenant, "leader-a", "leader-b")  # the new leader looked at both again
        assert len(_workflows(box, tenant, "leader-a")) == 1  # adopted, not made again
        assert len(_workflows(box, tenant, "leader-b")) == 1

        # a clean stop (SIGTERM, as in a rolling update) gives the Lease up at once
        standby.stop()
        wait_until(lambda: _holder(box, lease) == "", timeout=20, what="the Lease released on SIGTERM",
                   detail=standby.log)
    finally:
        hold.set()
