"""A watch that must relist (410 Gone), on the box's real API server (issue 16).

The operator (kopf, as its own ServiceAccount) reaches the API server through a recording HTTP
proxy that can cut every connection and refuse new ones. While the operator is cut off, one
Workspace is created and another's spec is changed, and the CRD is re-applied with a changed
description (as an upgrade re-applies it): the API server then rebuilds the Workspaces' watch
cache from etcd, and a watch that resumes from any resourceVersion older than the rebuild is
answered ``410 Gone`` ("too old resource version"). The test waits until the server gives that
answer for a resourceVersion newer than anything the operator has seen, then lets the operator
back. Its watch resumes from its last resourceVersion, gets the 410 (seen in the proxy's record),
kopf lists the Workspaces again, and both changes get their Workflow. The periodic resync is set to
an hour, so the relist is the only way the operator can learn of them.

Why not compact etcd: a Workspace watch is served from the API server's watch cache, which keeps
the recent events in memory. On the box, compacting etcd at its current revision through its v3
HTTP gateway and then watching from an older resourceVersion still streamed the events after it
(tried by hand; kube-apiserver v1.33.13). Only a rebuilt watch cache forgets them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml

from api.labels import KAIFLOW_PREFIX, LABEL_GENERATION, LABEL_WORKSPACE
from tests.cluster.conftest import workspace_file
from tests.fixtures.api_proxy import ApiProxy
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml"
EXAMPLE = "kaito_workspace_tuning_phi_3.yaml"
LAST_HANDLED = f"{KAIFLOW_PREFIX}/last-handled-configuration"  # kopf's record of what it handled


def workflows(box, namespace: str, workspace: str, generation: int | None = None) -> list[dict]:
    selector = f"{LABEL_WORKSPACE}={workspace}" + (f",{LABEL_GENERATION}={generation}" if generation else "")
    return box.list("workflows.argoproj.io", namespace=namespace, selector=selector)


def crd_with_description(text: str | None) -> str:
    """The install's CRD, its v1alpha1 schema described by ``text`` (None: the file as shipped)."""
    crd = yaml.safe_load(CRD.read_text())
    if text is not None:
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = text
    return yaml.safe_dump(crd)


def answers_too_old(box, namespace: str, resource_version: int) -> bool:
    """Whether the API server answers 410 Gone to a Workspace watch from ``resource_version``."""
    done = box.kubectl("get", "--raw", f"/apis/kaito.sh/v1beta1/namespaces/{namespace}/workspaces"
                       f"?watch=true&resourceVersion={resource_version}&timeoutSeconds=1", check=False, timeout=30)
    return '"code":410' in done.stdout


def test_a_watch_answered_410_gone_relists_and_loses_no_workspace(installed, tenant, start_controller, argo_agent,
                                                                  tmp_path):
    box = installed
    # Argo's pods wait in provision-nodes until the end: only the Workspaces change.
    hold = threading.Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"}),
                      hold=hold)
    proxy = ApiProxy(box.server, str(box.pki.ca))
    kubeconfig = proxy.kubeconfig(tmp_path / "proxied.kubeconfig", box.token("kaiflow-controller", "kaiflow-system"))
    operator = start_controller(None, "--resync-s", "3600", "--provider", "karpenter", "--namespace", tenant,
                                kubeconfig=kubeconfig)
    crd_changed = False

    def story() -> str:
        lines = [f"{e.number} {e.method} {e.path} -> {e.status} {bytes(e.answer[:200])!r}"
                 for e in proxy.record() if e.on("workspaces")]
        return "\n".join(lines[-40:]) + "\n" + operator.log()[-4000:]

    try:
        changed = workspace_file(EXAMPLE, tenant, name="changed-while-cut")
        box.apply(changed)
        wait_until(lambda: workflows(box, tenant, "changed-while-cut", 1), timeout=60,
                   what="the first generation's Workflow", detail=story)
        # kopf has handled it, and its watch of the Workspaces is open
        wait_until(lambda: LAST_HANDLED in (box.get("workspace.kaito.sh", "changed-while-cut", tenant)
                                            ["metadata"].get("annotations") or {}),
                   timeout=60, what="kopf's record of the handled generation", detail=story)
        wait_until(lambda: any(e.on("workspaces") and e.watch for e in proxy.record()), timeout=60,
                   what="the operator's Workspace watch", detail=story)

        proxy.cut()
        # every resourceVersion the operator has seen is older than this object's
        marker = json.loads(box.kubectl("create", "configmap", "after-the-cut", "-n", tenant, "-o", "json").stdout)
        mark = int(marker["metadata"]["resourceVersion"])
        box.apply(workspace_file(EXAMPLE, tenant, name="created-while-cut"))
        changed["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
        box.apply(changed)
        box.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input=crd_with_description("Workspace, re-applied by tests/cluster/test_relist.py."))
        crd_changed = True
        wait_until(lambda: answers_too_old(box, tenant, mark), timeout=60,
                   what=f"410 Gone for a Workspace watch from resourceVersion {mark}")
        proxy.mend()

        created = wait_until(lambda: workflows(box, tenant, "created-while-cut"), timeout=90,
                             what="the Workflow of the Workspace created while the operator was cut off", detail=story)
        second = wait_until(lambda: workflows(box, tenant, "changed-while-cut", 2), timeout=90,
                            what="the second generation's Workflow", detail=story)
        assert len(created) == 1 and len(second) == 1, (created, second)

        record = proxy.record()
        gone = [e for e in record if e.on("workspaces") and e.watch and b'"code":410' in e.answer]
        assert gone, story()
        first = gone[0]
        assert int(first.query["resourceVersion"][0]) < mark, first.path  # it resumed from where it was
        assert b"too old resource version" in first.answer
        relists = [e for e in record if e.number > first.number and e.on("workspaces") and not e.watch
                   and e.method == "GET" and e.status == 200]
        assert relists, story()
        listed = json.loads(bytes(relists[0].answer))
        assert {"created-while-cut", "changed-while-cut"} <= {w["metadata"]["name"] for w in listed["items"]}
        # Gone while the operator runs: its finalizer releases the NodeClaims it requested for them.
        box.kubectl("delete", "wks", "--all", "-n", tenant, "--timeout=120s", timeout=150)
    finally:
        hold.set()
        operator.stop()
        proxy.stop()
        if crd_changed:
            box.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd_with_description(None))
