"""The install's egress NetworkPolicy on the real API server (issue 17 item 4): the per-namespace
overlay of docs/install.md creates it in a tenant namespace. (The box has no CNI, so what the policy
allows is checked by reading it: tests/controller/test_egress_policy.py.)"""

from __future__ import annotations

from api.labels import EGRESS_PUBLIC, LABEL_EGRESS


def test_the_api_server_accepts_it_in_a_tenant_namespace(installed, tenant):
    found = installed.get("networkpolicy", "kaiflow-dataset-egress", tenant)
    assert found is not None and found["spec"]["podSelector"]["matchLabels"] == {LABEL_EGRESS: EGRESS_PUBLIC}
