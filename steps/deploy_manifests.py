"""The Deployment and Service that serve a Workspace in a cluster, as plain dicts.

Built from small modifier functions (as Kaito builds pod specs): the base Deployment, then the
adapters' init container, GPU resources and node placement, the API key, the owner reference.
Each takes and returns the manifest, so tests check one concern at a time and nothing here
talks to a cluster (:mod:`steps.deploy` applies them).

Kaito users' habits hold: the Service is named after the Workspace and listens on port 80, so
``kubectl get svc <workspace>`` then ``curl http://$CLUSTERIP/chat -d '{"prompt": ...}'`` works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

BENTO_PORT = 3000
ADAPTERS_MOUNT = "/adapters"
DOCKER_CONFIG_MOUNT = "/var/run/kaiflow/docker"
SERVICE_IMPORT = "serving_bento.service:KaiflowChat"
GPU_RESOURCE = "nvidia.com/gpu"
WORKSPACE_API_VERSION = "kaito.sh/v1beta1"
# Kaito's GPU nodes carry this taint; the serving pod must tolerate it to land there.
GPU_TOLERATION = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}


@dataclass(frozen=True)
class AdapterImage:
    name: str
    image: str
    strength: float = 1.0


@dataclass(frozen=True)
class ClusterDeployment:
    """Everything the manifests depend on (filled from the deploy step's flags)."""

    workspace_name: str
    namespace: str
    preset: str
    image: str
    workspace_uid: str = ""
    adapters: tuple[AdapterImage, ...] = ()
    gpus: int = 1
    replicas: int = 1
    node_labels: dict[str, str] = field(default_factory=dict)
    docker_config_secret: str = ""
    api_key_secret: str = ""
    insecure_registry: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "kaiflow-chat",
            "app.kubernetes.io/instance": self.workspace_name,
            "app.kubernetes.io/managed-by": "kaiflow",
            "kaito.sh/workspace": self.workspace_name,
        }

    @property
    def selector(self) -> dict[str, str]:
        return {"kaito.sh/workspace": self.workspace_name}


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:80"


def base_deployment(d: ClusterDeployment) -> dict[str, Any]:
    env = {
        "KAIFLOW_MODEL": d.preset,
        "KAIFLOW_SERVED_MODEL_NAME": d.preset,
        "BENTOML_DO_NOT_TRACK": "True",
        **d.env,
    }
    chat = {
        "name": "chat",
        "image": d.image,
        "command": ["bentoml", "serve", SERVICE_IMPORT, "--host", "0.0.0.0", "--port", str(BENTO_PORT)],
        "ports": [{"name": "http", "containerPort": BENTO_PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        # ready only once the model and adapters are loaded (the service's __is_ready__)
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        # /livez stays up while a big model loads; it fails if loading failed or the engine died
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "initialDelaySeconds": 30,
                          "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": d.workspace_name, "namespace": d.namespace, "labels": d.labels},
        "spec": {
            "replicas": d.replicas,
            "selector": {"matchLabels": d.selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": d.labels},
                "spec": {
                    "containers": [chat],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def _chat(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in _pod(manifest)["containers"] if c["name"] == "chat")


def with_adapters(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """An init container pulls every adapter into an emptyDir the chat container reads."""
    if not d.adapters:
        return manifest
    pod = _pod(manifest)
    args = ["python", "-m", "steps.pull_adapters"]
    for a in d.adapters:
        args += ["--adapter", f"{a.name}={a.image}"]
    args += ["--dest", ADAPTERS_MOUNT, "--outputs", "/tmp/kaiflow-outputs"]
    mounts = [{"name": "adapters", "mountPath": ADAPTERS_MOUNT}]
    if d.docker_config_secret:
        args += ["--docker-config", f"{DOCKER_CONFIG_MOUNT}/config.json"]
        mounts.append({"name": "docker-config", "mountPath": DOCKER_CONFIG_MOUNT, "readOnly": True})
        pod["volumes"].append({"name": "docker-config", "secret": {
            "secretName": d.docker_config_secret, "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})
    if d.insecure_registry:
        args.append("--insecure")
    pod["initContainers"] = [{"name": "pull-adapters", "image": d.image, "command": args, "volumeMounts": mounts}]
    pod["volumes"].append({"name": "adapters", "emptyDir": {}})
    chat = _chat(manifest)
    chat["volumeMounts"].append({"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True})
    spec = [{"name": a.name, "path": f"{ADAPTERS_MOUNT}/{a.name}", "strength": a.strength} for a in d.adapters]
    chat["env"].append({"name": "KAIFLOW_ADAPTERS", "value": json.dumps(spec)})
    return manifest


def with_gpus(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    if d.gpus <= 0:
        return manifest
    _chat(manifest)["resources"] = {"requests": {GPU_RESOURCE: str(d.gpus)}, "limits": {GPU_RESOURCE: str(d.gpus)}}
    _pod(manifest)["tolerations"] = [dict(GPU_TOLERATION)]
    return manifest


def with_node_selector(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """Land on the Workspace's nodes: its resource.labelSelector.matchLabels."""
    if d.node_labels:
        _pod(manifest)["nodeSelector"] = dict(d.node_labels)
    return manifest


def with_api_key(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """The key is referenced from a Secret (key ``api-key``), never written into the manifest."""
    if d.api_key_secret:
        _chat(manifest)["env"].append({"name": "KAIFLOW_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": d.api_key_secret, "key": "api-key"}}})
    return manifest


def with_owner(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """Deleting the Workspace deletes what serves it (garbage collection by owner reference)."""
    if d.workspace_uid:
        manifest["metadata"]["ownerReferences"] = [{
            "apiVersion": WORKSPACE_API_VERSION, "kind": "Workspace", "name": d.workspace_name,
            "uid": d.workspace_uid, "controller": True, "blockOwnerDeletion": True,
        }]
    return manifest


def render_deployment(d: ClusterDeployment) -> dict[str, Any]:
    manifest = base_deployment(d)
    for modify in (with_adapters, with_gpus, with_node_selector, with_api_key, with_owner):
        manifest = modify(manifest, d)
    return manifest


def render_service(d: ClusterDeployment) -> dict[str, Any]:
    manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": d.workspace_name, "namespace": d.namespace, "labels": d.labels},
        "spec": {
            "type": "ClusterIP",
            "selector": d.selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return with_owner(manifest, d)
