"""steps.deploy.manifests: the Deployment and Service a cluster runs, one modifier at a time."""

from __future__ import annotations

import json

import pytest

from steps.deploy.manifests import (
    BENTO_PORT,
    AdapterImage,
    ClusterDeployment,
    render_deployment,
    render_service,
    service_url,
    sizes_for_weights,
)

UID = "3f1c0a8e-1111-2222-3333-444455556666"


def make(**kw) -> ClusterDeployment:
    base = dict(workspace_name="ws-phi", namespace="team-a", preset="phi-3-mini-4k-instruct",
                image="ghcr.io/example/kaiflow:1.0", workspace_uid=UID,
                adapters=(AdapterImage("tone", "registry.example.com/tone:v1", 0.5),
                          AdapterImage("legal", "registry.example.com/legal@sha256:" + "a" * 64, 1.0)),
                gpus=2, node_labels={"apps": "phi-3"}, docker_config_secret="regcred", api_key_secret="chat-key",
                memory_request="12Gi", cache_size="11Gi")
    base.update(kw)
    return ClusterDeployment(**base)


def pod_of(deployment):
    return deployment["spec"]["template"]["spec"]


def chat_container(deployment):
    return pod_of(deployment)["containers"][0]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts_of(container):
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_service_is_named_after_the_workspace_on_port_80():
    svc = render_service(make())
    assert svc["metadata"]["name"] == "ws-phi" and svc["metadata"]["namespace"] == "team-a"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    deployment = render_deployment(make())
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert service_url("ws-phi", "team-a") == "http://ws-phi.team-a.svc.cluster.local:80"
    for manifest in (svc, deployment):
        assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kaiflow"
        assert manifest["metadata"]["labels"]["kaito.sh/workspace"] == "ws-phi"


def test_chat_container_serves_bento():
    c = chat_container(render_deployment(make()))
    assert c["command"][:3] == ["bentoml", "serve", "serving_bento.service:KaiflowChat"]
    assert c["ports"] == [{"name": "http", "containerPort": BENTO_PORT, "protocol": "TCP"}]
    env = env_of(c)
    assert env["KAIFLOW_MODEL"] == "phi-3-mini-4k-instruct" and env["BENTOML_DO_NOT_TRACK"] == "True"


def test_probes_give_the_model_time_to_load_and_survive_a_busy_loop():
    c = chat_container(render_deployment(make(startup_timeout=1200)))
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 1200  # liveness waits for loading
    assert ready["httpGet"] == {"path": "/readyz", "port": "http"}
    assert live["httpGet"] == {"path": "/livez", "port": "http"}
    # the default timeoutSeconds (1 s) fails while the generate loop holds the CPU
    assert ready["timeoutSeconds"] >= 5 and live["timeoutSeconds"] >= 10
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    assert "initialDelaySeconds" not in live  # the startupProbe does that job


def test_restricted_security_context_on_every_container():
    deployment = render_deployment(make())
    pod = pod_of(deployment)
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    containers = [*pod["initContainers"], *pod["containers"]]
    assert [c["name"] for c in containers] == ["pull-adapters", "chat"]
    for container in containers:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}, container["name"]


def test_read_only_root_gets_bounded_writable_scratch_space():
    deployment = render_deployment(make())
    pod, chat = pod_of(deployment), chat_container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for volume in volumes.values():
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), volume  # the kubelet evicts instead of filling the disk
    assert volumes["cache"]["emptyDir"] == {"sizeLimit": "11Gi"}
    assert volumes["dshm"]["emptyDir"] == {"sizeLimit": "1Gi", "medium": "Memory"}
    mounts = mounts_of(chat)
    assert {"/tmp", "/var/cache/kaiflow", "/dev/shm", "/adapters"} <= set(mounts)
    env = env_of(chat)
    for variable in ("HF_HOME", "BENTOML_HOME", "XDG_CACHE_HOME"):
        assert env[variable].startswith("/var/cache/kaiflow"), variable
    (init,) = pod["initContainers"]
    assert {"/tmp", "/adapters"} <= set(mounts_of(init)) and env_of(init)["HOME"] == "/tmp"


def test_requests_limits_and_gpus():
    deployment = render_deployment(make())
    resources = chat_container(deployment)["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "12Gi", "ephemeral-storage": "12Gi",
                                     "nvidia.com/gpu": "2"}
    assert resources["limits"] == {"memory": "13Gi", "nvidia.com/gpu": "2"}  # room for the Memory /dev/shm
    assert pod_of(deployment)["tolerations"] == [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert pod_of(deployment)["nodeSelector"] == {"apps": "phi-3"}
    cpu = render_deployment(make(gpus=0, node_labels={}))
    assert "nvidia.com/gpu" not in chat_container(cpu)["resources"]["requests"]
    assert "nodeSelector" not in pod_of(cpu) and "tolerations" not in pod_of(cpu)


def test_sizes_follow_the_weights():
    assert sizes_for_weights(int(7.6e9)) == {"memory_request": "12Gi", "cache_size": "10Gi"}
    assert sizes_for_weights(0) == {"memory_request": "4Gi", "cache_size": "2Gi"}


def test_rollout_keeps_one_replica_serving():
    strategy = render_deployment(make())["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_init_container_pulls_adapters_the_service_reads_with_strengths():
    d = render_deployment(make())
    pod = pod_of(d)
    (init,) = pod["initContainers"]
    args = init["command"]
    assert args[:3] == ["python", "-m", "steps.pull_adapters"]
    assert args[args.index("--dest") + 1] == "/adapters"
    assert ["--adapter", "tone=registry.example.com/tone:v1"] == args[3:5]
    assert args[args.index("--docker-config") + 1] == "/var/run/kaiflow/docker/config.json"
    assert {"name": "docker-config", "secret": {"secretName": "regcred", "items": [
        {"key": ".dockerconfigjson", "path": "config.json"}]}} in pod["volumes"]
    adapters = json.loads(env_of(chat_container(d))["KAIFLOW_ADAPTERS"])
    assert adapters == [{"name": "tone", "path": "/adapters/tone", "strength": 0.5},
                        {"name": "legal", "path": "/adapters/legal", "strength": 1.0}]
    assert mounts_of(chat_container(d))["/adapters"] == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}


def test_no_adapters_means_no_init_container():
    d = render_deployment(make(adapters=(), docker_config_secret=""))
    assert "initContainers" not in pod_of(d)
    assert "KAIFLOW_ADAPTERS" not in env_of(chat_container(d))
    assert "adapters" not in {v["name"] for v in pod_of(d)["volumes"]}


@pytest.mark.parametrize(("field", "variable", "key"), [
    ("api_key_secret", "KAIFLOW_API_KEY", "api-key"),
    ("model_access_secret", "HF_TOKEN", "HF_TOKEN"),
])
def test_secrets_are_referenced_never_inlined(field, variable, key):
    deployment = render_deployment(make(**{field: "the-secret"}))
    env = env_of(chat_container(deployment))
    assert env[variable] == {"secretKeyRef": {"name": "the-secret", "key": key}}
    assert variable not in env_of(chat_container(render_deployment(make(**{field: ""}))))


def test_owner_reference():
    for manifest in (render_deployment(make()), render_service(make())):
        assert manifest["metadata"]["ownerReferences"] == [{
            "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "name": "ws-phi", "uid": UID,
            "controller": True, "blockOwnerDeletion": True}]
    assert "ownerReferences" not in render_deployment(make(workspace_uid=""))["metadata"]


@pytest.mark.parametrize("render", [render_deployment, render_service])
def test_every_field_is_a_kubernetes_field(render):
    """Round trip through the kubernetes client's typed models: a misspelled field would be dropped."""
    from kubernetes.client import ApiClient

    manifest = render(make(model_access_secret="hf-token", insecure_registry=True))
    api = ApiClient()
    typed = api.deserialize(json.dumps(manifest), f"V1{manifest['kind']}", "application/json")
    assert api.sanitize_for_serialization(typed) == manifest
