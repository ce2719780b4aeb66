"""The install's egress NetworkPolicy for dataset downloads (issue 17 item 4): it selects the pods
the cluster rendering labels (fetch-dataset) and allows DNS and public addresses only
(tests/cluster/test_dataset_egress.py: the box's API server accepts it in a tenant namespace)."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import yaml

from api.labels import EGRESS_PUBLIC, LABEL_EGRESS
from controller.decide import decide
from controller.options import ControllerOptions

ROOT = Path(__file__).resolve().parents[2]
INNER = ["10.0.0.1", "10.96.0.10", "172.17.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "168.63.129.16",
         "100.64.0.1", "0.0.0.0", "::1", "fd00::1", "fe80::1"]
# (IPv4-mapped IPv6 ranges are refused by the API server's CIDR validation; on the wire such a
# connection is IPv4 and meets the IPv4 rule. The step refuses them itself: test_egress.py.)
PUBLIC = ["20.60.1.2", "140.82.112.3", "2606:4700::1111"]


def policy() -> dict:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "controller" / "manifests" / "workflows")],
                         capture_output=True, text=True, check=True).stdout
    return next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "NetworkPolicy")


def allowed(pol: dict, address: str, port: int) -> bool:
    ip = ipaddress.ip_address(address)
    for rule in pol["spec"]["egress"]:
        if port not in [p["port"] for p in rule.get("ports") or []]:
            continue
        for peer in rule.get("to") or []:
            block = peer.get("ipBlock")
            if not block or ip.version != ipaddress.ip_network(block["cidr"]).version:
                continue
            if ip in ipaddress.ip_network(block["cidr"]) and not any(
                    ip.version == ipaddress.ip_network(e).version and ip in ipaddress.ip_network(e)
                    for e in block.get("except") or []):
                return True
    return False


def test_the_policy_selects_the_fetch_pods_and_allows_public_addresses_only():
    pol = policy()
    assert pol["spec"]["policyTypes"] == ["Egress"]
    assert pol["spec"]["podSelector"] == {"matchLabels": {LABEL_EGRESS: EGRESS_PUBLIC}}
    verdict = decide(yaml.safe_load((ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml").read_text()),
                     ControllerOptions())
    fetch = next(t for t in verdict.manifest["spec"]["templates"] if t["name"] == "fetch-dataset")
    assert fetch["metadata"]["labels"][LABEL_EGRESS] == EGRESS_PUBLIC
    for address in INNER:
        assert not allowed(pol, address, 443), address
    for address in PUBLIC:
        assert allowed(pol, address, 443), address
    assert not allowed(pol, "20.60.1.2", 22)
    dns = pol["spec"]["egress"][0]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}

