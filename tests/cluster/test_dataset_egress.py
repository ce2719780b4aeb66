"""The install's egress NetworkPolicy on the real API server (issue 17 item 4): the per-namespace
overlay of docs/install.md creates it in a tenant namespace. (The box has no CNI, so what the policy
allows is checked by reading it: tests/controller/test_egress_policy.py.)"""

from __future__ import annotations

from api.labels import EGRESS_PUBLIC, LABEL_EGRESS


def test_the_api_server_accepts_it_in_a_tenant_namespace(installed, tenant):
    found = installed.get("networkpolicy", "kaiflow-dataset-egress", tenant)
    assert found is not None and found["spec"]["podSelector"]["matchLabels"] == {LABEL_EGRESS: EGRESS_PUBLIC}


def test_signed_dataset_urls_reach_the_pod_through_a_secret_the_operator_creates(installed, tenant, start_controller,
                                                                                 argo_agent):
    """Issue 17 (Low): the operator, as its own ServiceAccount (which may create Secrets but read
    none), puts a signed URL in a new Secret; the Workflow Argo accepts mounts it and carries no
    signature anywhere."""
    import json
    import threading
    from pathlib import Path

    import yaml

    from tests.fixtures.argo_agent import Outcome
    from tests.fixtures.cluster import wait_until

    signed = "https://acct.blob.core.windows.net/data/train.parquet?sv=2025-01-05&sig=S3CRETSIGNATURE"
    example = Path(__file__).resolve().parents[2] / "examples" / "kaito_workspace_tuning_phi_3.yaml"
    ws = next(d for d in yaml.safe_load_all(example.read_text()) if d and d["kind"] == "Workspace")
    ws["metadata"]["namespace"] = tenant
    ws["tuning"]["input"]["urls"] = [signed]
    hold = threading.Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(), hold=hold)
    kubeconfig = installed.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    operator = start_controller(None, "--resync-s", "2", "--provider", "karpenter", kubeconfig=kubeconfig)
    try:
        installed.apply(ws)
        (workflow,) = wait_until(lambda: installed.list("workflows.argoproj.io", namespace=tenant), timeout=60,
                                 what="the Workflow", detail=operator.log)
        assert "S3CRETSIGNATURE" not in json.dumps(workflow)
        volume = next(v for v in workflow["spec"]["volumes"] if v["name"] == "dataset-urls")
        secret = installed.get("secret", volume["secret"]["secretName"], tenant)
        assert secret["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
        import base64

        assert base64.b64decode(secret["data"]["dataset-urls.txt"]).decode() == signed + "\n"
        can_read = installed.kubectl("auth", "can-i", "get", "secrets", "-n", tenant,
                                     "--as=system:serviceaccount:kaiflow-system:kaiflow-controller", check=False)
        assert can_read.stdout.strip() == "no"
    finally:
        hold.set()
