"""The shared `kube` fixture behaves like an API server for the kubernetes client (tests/fixtures/kube.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from kubernetes import client, config, watch

NODECLAIMS = ("karpenter.sh", "v1", "nodeclaims")


def nodeclaim(name: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"requirements": [{"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_NC6s_v3"]}]},
    }


def test_kubeconfig_points_the_normal_client_at_the_emulator(kube):
    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig))
    with api_client:
        names = [ns.metadata.name for ns in client.CoreV1Api(api_client).list_namespace().items]
    assert names == ["default", "kube-system"]
    assert kube.url.startswith("http://127.0.0.1:")
    assert kube.env == {"KUBECONFIG": str(kube.kubeconfig)}


def test_create_answers_201_with_server_metadata_and_conflicts_on_duplicates(kube):
    api = client.CustomObjectsApi(kube.api_client)
    created = api.create_cluster_custom_object(*NODECLAIMS, nodeclaim("ws1"))
    meta = created["metadata"]
    assert meta["name"] == "ws1" and meta["generation"] == 1
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["creationTimestamp"].endswith("Z")

    with pytest.raises(client.ApiException) as exc:
        api.create_cluster_custom_object(*NODECLAIMS, nodeclaim("ws1"))
    assert exc.value.status == 409 and '"reason": "AlreadyExists"' in exc.value.body

    ws = api.create_namespaced_custom_object(
        "kaito.sh", "v1beta1", "default", "workspaces", {"metadata": {"generateName": "ws-"}}
    )
    assert ws["metadata"]["name"].startswith("ws-") and ws["metadata"]["namespace"] == "default"
    assert ws["kind"] == "Workspace" and ws["apiVersion"] == "kaito.sh/v1beta1"


def test_unknown_resources_and_objects_are_404(kube):
    api = client.CustomObjectsApi(kube.api_client)
    with pytest.raises(client.ApiException) as exc:
        api.list_namespaced_custom_object("example.com", "v1", "default", "things")
    assert exc.value.status == 404 and "CRD" in exc.value.body
    with pytest.raises(client.ApiException) as exc:
        api.get_cluster_custom_object(*NODECLAIMS, "missing")
    assert exc.value.status == 404 and exc.value.reason == "Not Found"
    assert '"reason": "NotFound"' in exc.value.body and 'nodeclaims.karpenter.sh \\"missing\\" not found' in exc.value.body
    with pytest.raises(client.ApiException) as exc:
        api.delete_cluster_custom_object(*NODECLAIMS, "missing")
    assert exc.value.status == 404


def test_label_and_field_selectors_filter_lists(kube):
    kube.add_node("a", labels={"pool": "gpu", "zone": "1"})
    kube.add_node("b", labels={"pool": "cpu"})
    kube.add_node("c", labels={"pool": "gpu"}, ready=False)
    core = client.CoreV1Api(kube.api_client)

    def names(**kwargs) -> list[str]:
        return [n.metadata.name for n in core.list_node(**kwargs).items]

    assert names(label_selector="pool=gpu") == ["a", "c"]
    assert names(label_selector="pool!=gpu") == ["b"]
    assert names(label_selector="pool in (gpu,cpu),zone") == ["a"]
    assert names(label_selector="pool notin (gpu),!zone") == ["b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    listed = core.list_node()
    assert listed.metadata.resource_version.isdigit()
    with pytest.raises(client.ApiException) as exc:
        core.list_node(label_selector="pool in gpu")
    assert exc.value.status == 400


def test_status_subresource_and_generation(kube):
    api = client.CustomObjectsApi(kube.api_client)
    api.create_cluster_custom_object(*NODECLAIMS, nodeclaim("ws1"))

    after_status = api.patch_cluster_custom_object_status(*NODECLAIMS, "ws1", {"status": {"nodeName": "n1"}})
    assert after_status["status"] == {"nodeName": "n1"} and after_status["metadata"]["generation"] == 1

    after_main = api.patch_cluster_custom_object(*NODECLAIMS, "ws1", {"spec": {"taints": []}, "status": {"nodeName": "x"}})
    assert after_main["status"] == {"nodeName": "n1"}, "the main endpoint must ignore status"
    assert after_main["metadata"]["generation"] == 2
    assert int(after_main["metadata"]["resourceVersion"]) > int(after_status["metadata"]["resourceVersion"])

    labels_only = api.patch_cluster_custom_object(*NODECLAIMS, "ws1", {"metadata": {"labels": {"k": "v"}}})
    assert labels_only["metadata"]["generation"] == 2


def test_patch_flavours_conflicts_and_replace(kube):
    kube.add_node("n1", ready=False)
    core = client.CoreV1Api(kube.api_client)
    core.patch_node("n1", [{"op": "add", "path": "/metadata/labels/json-patch", "value": "yes"}])
    assert core.read_node("n1").metadata.labels["json-patch"] == "yes"

    # Strategic merge: conditions merge by type instead of replacing the list.
    core.patch_node_status("n1", {"status": {"conditions": [{"type": "MemoryPressure", "status": "False"}]}})
    conditions = {c.type: c.status for c in core.read_node("n1").status.conditions}
    assert conditions == {"Ready": "False", "MemoryPressure": "False"}

    stale = core.read_node("n1")
    core.patch_node("n1", {"metadata": {"labels": {"a": "1"}}})
    with pytest.raises(client.ApiException) as exc:
        core.replace_node("n1", stale)
    assert exc.value.status == 409

    fresh = core.read_node("n1")
    fresh.metadata.labels["b"] = "2"
    assert core.replace_node("n1", fresh).metadata.labels["b"] == "2"


def test_finalizers_hold_deletion_until_removed(kube):
    api = client.CustomObjectsApi(kube.api_client)
    args = ("kaito.sh", "v1beta1", "default", "workspaces")
    api.create_namespaced_custom_object(*args, {"metadata": {"name": "ws", "finalizers": ["kaito.sh/x"]}})
    api.delete_namespaced_custom_object(*args, "ws")
    assert api.get_namespaced_custom_object(*args, "ws")["metadata"]["deletionTimestamp"]
    api.patch_namespaced_custom_object(*args, "ws", {"metadata": {"finalizers": None}})
    with pytest.raises(client.ApiException) as exc:
        api.get_namespaced_custom_object(*args, "ws")
    assert exc.value.status == 404


def test_watch_honours_selectors_resource_version_and_timeout(kube):
    kube.add_node("old", labels={"pool": "gpu"})
    core = client.CoreV1Api(kube.api_client)
    since = core.list_node().metadata.resource_version

    def later() -> None:
        time.sleep(0.2)
        kube.add_node("other", labels={"pool": "cpu"})
        kube.add_node("new", labels={"pool": "gpu"})

    thread = threading.Thread(target=later)
    thread.start()
    started = time.monotonic()
    events = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(core.list_node, label_selector="pool=gpu", resource_version=since, timeout_seconds=1)
    ]
    thread.join()
    assert 0.9 < time.monotonic() - started < 60  # the server ends the watch at 1 s, not before; never hangs
    assert events == [("ADDED", "new"), ("MODIFIED", "new")], "no replay of 'old', nothing of pool=cpu"


def test_simulate_karpenter_launches_nodes_for_nodeclaims(kube):
    api = client.CustomObjectsApi(kube.api_client)
    body = nodeclaim("ws1", labels={"apps": "ws1"})
    body["spec"]["taints"] = [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
    with kube.simulate_karpenter() as handled:
        api.create_cluster_custom_object(*NODECLAIMS, body)
        deadline = time.monotonic() + 5
        while not handled and time.monotonic() < deadline:
            time.sleep(0.05)
    claim = api.get_cluster_custom_object(*NODECLAIMS, "ws1")
    assert {c["type"]: c["status"] for c in claim["status"]["conditions"]}["Ready"] == "True"
    node = client.CoreV1Api(kube.api_client).read_node(claim["status"]["nodeName"])
    assert node.metadata.labels["apps"] == "ws1"
    assert node.metadata.labels["node.kubernetes.io/instance-type"] == "Standard_NC6s_v3"
    assert [(t.key, t.effect) for t in node.spec.taints] == [("sku", "NoSchedule")]


def test_versions_of_a_crd_share_one_store(kube):
    api = client.CustomObjectsApi(kube.api_client)
    api.create_namespaced_custom_object("kaito.sh", "v1alpha1", "default", "workspaces", {"metadata": {"name": "ws"}})
    served = api.get_namespaced_custom_object("kaito.sh", "v1beta1", "default", "workspaces", "ws")
    assert served["apiVersion"] == "kaito.sh/v1beta1"
    listed = api.list_namespaced_custom_object("kaito.sh", "v1alpha1", "default", "workspaces")["items"]
    assert [(o["apiVersion"], o["metadata"]["name"]) for o in listed] == [("kaito.sh/v1alpha1", "ws")]


def test_failures_can_be_injected_with_kmocks_dsl(kube):
    kube.emulator["post", kube.emulator.resource("karpenter.sh/v1/nodeclaims")] << 503 << {"message": "etcd is sad"}
    api = client.CustomObjectsApi(kube.api_client)
    with pytest.raises(client.ApiException) as exc:
        api.create_cluster_custom_object(*NODECLAIMS, nodeclaim("ws1"), _request_timeout=5)
    assert exc.value.status == 503
    assert kube.list("/apis/karpenter.sh/v1/nodeclaims") == []


def test_kopf_operators_run_against_it(kube, tmp_path):
    operator = tmp_path / "operator.py"
    operator.write_text(
        "import kopf\n"
        "@kopf.on.create('kaito.sh', 'v1beta1', 'workspaces')\n"
        "def created(name, patch, **_):\n"
        "    patch.status['phase'] = 'Seen'\n"
    )
    log = tmp_path / "kopf.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "-n", "default", str(operator)],
                                env={**os.environ, **kube.env}, stdout=out, stderr=subprocess.STDOUT)
        try:
            kube.create("/apis/kaito.sh/v1beta1/namespaces/default/workspaces", {"metadata": {"name": "ws"}})
            path = "/apis/kaito.sh/v1beta1/namespaces/default/workspaces/ws"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (kube.get(path).get("status") or {}).get("phase"):
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(10)
    assert kube.get(path)["status"]["phase"] == "Seen", log.read_text()[-2000:]
    assert log.read_text().count("Handler 'created' succeeded") == 1, "each event handled once"


def test_simulate_deployments_rolls_them_out(kube):
    apps = client.AppsV1Api(kube.api_client)
    body = {
        "metadata": {"name": "chat", "labels": {"app": "chat"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "chat"}},
                 "template": {"metadata": {"labels": {"app": "chat"}},
                              "spec": {"containers": [{"name": "bento", "image": "example/chat:1"}]}}},
    }
    with kube.simulate_deployments("default") as rolled:
        apps.create_namespaced_deployment("default", body)
        deadline = time.monotonic() + 5
        while not rolled and time.monotonic() < deadline:
            time.sleep(0.05)
    status = apps.read_namespaced_deployment_status("chat", "default").status
    assert rolled == ["default/chat"]
    assert (status.ready_replicas, status.available_replicas, status.observed_generation) == (2, 2, 1)
