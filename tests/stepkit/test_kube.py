"""stepkit.kube against the Kubernetes API emulator over HTTP: apply, get, delete, error mapping."""

from __future__ import annotations

import pytest

from stepkit import kube as kube_api
from stepkit.common import RetryableError, StepError


def _config_map(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"},
            "data": data}


def test_server_side_apply_creates_then_updates(kube) -> None:
    client = kube_api.api_client(str(kube.kubeconfig))
    created = kube_api.server_side_apply(client, _config_map("ssa", {"a": "1"}))
    assert created["data"] == {"a": "1"}
    uid = created["metadata"]["uid"]
    updated = kube_api.server_side_apply(client, _config_map("ssa", {"a": "2", "b": "3"}))
    assert updated["metadata"]["uid"] == uid and updated["data"] == {"a": "2", "b": "3"}
    assert kube_api.get(client, "v1", "ConfigMap", "ssa", "default")["data"]["b"] == "3"
    assert kube_api.delete(client, "v1", "ConfigMap", "ssa", "default") is True
    assert kube_api.get(client, "v1", "ConfigMap", "ssa", "default") is None
    assert kube_api.delete(client, "v1", "ConfigMap", "ssa", "default") is False


def test_resource_paths() -> None:
    assert kube_api.resource_path("apps/v1", "Deployment", "x", "ns") == "/apis/apps/v1/namespaces/ns/deployments/x"
    assert kube_api.resource_path("karpenter.sh/v1", "NodeClaim", "n", "ns") == "/apis/karpenter.sh/v1/nodeclaims/n"
    assert kube_api.resource_path("v1", "Service", None, "ns") == "/api/v1/namespaces/ns/services"


@pytest.mark.parametrize(("status", "kind"), [(429, RetryableError), (503, RetryableError), (None, RetryableError),
                                              (403, StepError), (404, StepError), (422, StepError)])
def test_api_error_policy(status, kind) -> None:
    class Fake(Exception):
        pass

    exc = Fake("boom")
    exc.status = status
    exc.body = '{"message": "nope"}'
    error = kube_api.api_error(exc, "reading x")
    assert type(error) is kind
    assert "reading x" in str(error)
