"""The Deployment and Service that serve a Workspace in a cluster, as plain dicts.

Built from small modifier functions (as Kaito builds pod specs): the base Deployment, then its
security context and writable scratch space, resources, probes, the adapters' init container,
GPUs and node placement, the secrets it references, the owner reference. Each takes and returns
the manifest, so tests check one concern at a time and nothing here talks to a cluster
(:mod:`steps.deploy.cluster` applies them).

Kaito users' habits hold: the Service is named after the Workspace and listens on port 80, so
``kubectl get svc <workspace>`` then ``curl http://$CLUSTERIP/chat -d '{"prompt": ...}'`` works.

Why the pod looks the way it does:

* **Locked down**: non-root (the image's uid 1000), no privilege escalation, every capability
  dropped, seccomp ``RuntimeDefault``, read-only root filesystem (the restricted Pod Security
  Standard). What must be written goes to emptyDirs with a ``sizeLimit`` (the kubelet evicts a
  pod that outgrows one instead of filling the node's disk): ``/tmp``, the model cache (HF_HOME,
  BENTOML_HOME, XDG_CACHE_HOME point there; sized from the preset's weights), the pulled adapters
  and ``/dev/shm``.
* **Probes that survive a busy server**: a startupProbe on ``/readyz`` gives a model
  ``--startup-timeout`` s to download and load before liveness counts; readiness and liveness
  then allow 5 s / 10 s per answer (the default 1 s fails while the generate loop holds the
  CPU), and liveness only restarts after a minute of failures.
* **Rollouts keep one replica serving**: ``maxSurge: 1, maxUnavailable: 0`` — the new pod must
  be ready before an old one goes (a GPU cluster needs room for one more pod meanwhile).
* **Secrets by reference only**: the API key and the Hub token are ``secretKeyRef``s; their
  values never appear in the manifest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from api.labels import (
    API_KEY_SECRET_KEY,
    DOCKER_CONFIG_SECRET_KEY,
    GPU_TOLERATION,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_WORKSPACE,
    MANAGED_BY,
    MODEL_ACCESS_SECRET_KEY,
)
from api.workspace_types import GROUP, STORAGE_VERSION
from presets.catalog import served_model_name

BENTO_PORT = 3000
ADAPTERS_MOUNT = "/adapters"
CACHE_MOUNT = "/var/cache/kaiflow"
DOCKER_CONFIG_MOUNT = "/var/run/kaiflow/docker"
SERVICE_IMPORT = "serving_bento.service:KaiflowChat"
GPU_RESOURCE = "nvidia.com/gpu"
WORKSPACE_API_VERSION = f"{GROUP}/{STORAGE_VERSION}"
# The serving image's user (Dockerfile: useradd --uid 1000).
RUN_AS_USER = 1000
GIB = 2**30


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
    model_access_secret: str = ""
    insecure_registry: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    cache_size: str = "20Gi"
    tmp_size: str = "1Gi"
    shm_size: str = "1Gi"
    adapters_size: str = "4Gi"
    startup_timeout: int = 1800

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_NAME: "kaiflow-chat",
            LABEL_INSTANCE: self.workspace_name,
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_WORKSPACE: self.workspace_name,
        }

    @property
    def selector(self) -> dict[str, str]:
        return {LABEL_WORKSPACE: self.workspace_name}


def sizes_for_weights(weights_bytes: int) -> dict[str, str]:
    """Memory request and model-cache size for weights of this many bytes.

    The cache holds one copy of the weights as downloaded (+10 % and 2 GiB for tokenizer files
    and BentoML's own files); host memory holds a shard at a time while loading onto the GPU,
    plus the Python/torch runtime, so the weights size plus 4 GiB is a safe request.
    """
    weights_gib = weights_bytes / GIB
    return {"memory_request": f"{math.ceil(weights_gib) + 4}Gi",
            "cache_size": f"{math.ceil(weights_gib * 1.1) + 2}Gi"}


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:80"


def base_deployment(d: ClusterDeployment) -> dict[str, Any]:
    env = {
        "KAIFLOW_MODEL": d.preset,
        # Kaito's served name (mistral-7b-instruct-v0.3), as `kaiflow presets` and local runs say;
        # an inference ConfigMap's served-model-name (d.env) overrides it
        "KAIFLOW_SERVED_MODEL_NAME": served_model_name(d.preset),
        "BENTOML_DO_NOT_TRACK": "True",
        **d.env,
    }
    chat = {
        "name": "chat",
        "image": d.image,
        "command": ["bentoml", "serve", SERVICE_IMPORT, "--host", "0.0.0.0", "--port", str(BENTO_PORT)],
        "ports": [{"name": "http", "containerPort": BENTO_PORT, "protocol": "TCP"}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": [],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": d.workspace_name, "namespace": d.namespace, "labels": d.labels},
        "spec": {
            "replicas": d.replicas,
            "selector": {"matchLabels": d.selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": d.labels},
                "spec": {"containers": [chat], "volumes": []},
            },
        },
    }


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def _chat(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in _pod(manifest)["containers"] if c["name"] == "chat")


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod(manifest)
    return [*pod.get("initContainers", []), *pod["containers"]]


def _scratch(manifest: dict[str, Any], name: str, size: str, *, medium: str | None = None) -> None:
    volume: dict[str, Any] = {"sizeLimit": size}
    if medium:
        volume["medium"] = medium
    _pod(manifest)["volumes"].append({"name": name, "emptyDir": volume})


def _set_env(container: dict[str, Any], name: str, **value: Any) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [{"name": name, **value}]


def with_security_context(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """The restricted Pod Security Standard, and a read-only root filesystem (see the module doc)."""
    _pod(manifest)["securityContext"] = {
        "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    _pod(manifest)["automountServiceAccountToken"] = False  # the service never calls the Kubernetes API
    for container in _containers(manifest):
        container["securityContext"] = {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    return manifest


def with_scratch_space(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """Writable emptyDirs, each with a sizeLimit: /tmp, the model caches, /dev/shm (torch's workers)."""
    _scratch(manifest, "tmp", d.tmp_size)
    _scratch(manifest, "cache", d.cache_size)
    _scratch(manifest, "dshm", d.shm_size, medium="Memory")
    chat = _chat(manifest)
    chat["volumeMounts"] += [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for name, path in (("HF_HOME", "huggingface"), ("BENTOML_HOME", "bentoml"), ("XDG_CACHE_HOME", "")):
        _set_env(chat, name, value=f"{CACHE_MOUNT}/{path}".rstrip("/"))
    return manifest


def with_resources(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """CPU/memory requests; ephemeral storage for what the emptyDirs on disk may hold."""
    chat = _chat(manifest)
    resources = chat.setdefault("resources", {})
    storage = f"{_gib(d.cache_size) + _gib(d.tmp_size)}Gi"
    resources.setdefault("requests", {}).update(
        {"cpu": d.cpu_request, "memory": d.memory_request, "ephemeral-storage": storage})
    # /dev/shm is memory: it counts against the limit, so the limit leaves room for it.
    resources.setdefault("limits", {}).update({"memory": f"{_gib(d.memory_request) + _gib(d.shm_size)}Gi"})
    return manifest


def with_probes(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    chat = _chat(manifest)
    period = 10
    # Ready means model and adapters loaded (the service's __is_ready__); until then liveness waits.
    chat["startupProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": period,
                            "timeoutSeconds": 5, "failureThreshold": max(1, math.ceil(d.startup_timeout / period))}
    chat["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                              "timeoutSeconds": 5, "failureThreshold": 3}
    # /livez fails when loading failed or the engine died; a busy generate loop only answers slowly.
    chat["livenessProbe"] = {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 10,
                             "timeoutSeconds": 10, "failureThreshold": 6}
    return manifest


def with_adapters(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """An init container pulls every adapter into an emptyDir the chat container reads."""
    if not d.adapters:
        return manifest
    pod = _pod(manifest)
    args = ["python", "-m", "steps.pull_adapters"]
    for a in d.adapters:
        args += ["--adapter", f"{a.name}={a.image}"]
    args += ["--dest", ADAPTERS_MOUNT, "--outputs", "/tmp/kaiflow-outputs"]
    mounts = [{"name": "adapters", "mountPath": ADAPTERS_MOUNT}, {"name": "tmp", "mountPath": "/tmp"}]
    if d.docker_config_secret:
        args += ["--docker-config", f"{DOCKER_CONFIG_MOUNT}/config.json"]
        mounts.append({"name": "docker-config", "mountPath": DOCKER_CONFIG_MOUNT, "readOnly": True})
        pod["volumes"].append({"name": "docker-config", "secret": {
            "secretName": d.docker_config_secret, "items": [{"key": DOCKER_CONFIG_SECRET_KEY, "path": "config.json"}]}})
    if d.insecure_registry:
        args.append("--insecure")
    pod["initContainers"] = [{
        "name": "pull-adapters", "image": d.image, "command": args, "volumeMounts": mounts,
        "env": [{"name": "HOME", "value": "/tmp"}],  # the root filesystem is read-only
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
    }]
    _scratch(manifest, "adapters", d.adapters_size)
    chat = _chat(manifest)
    chat["volumeMounts"].append({"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True})
    spec = [{"name": a.name, "path": f"{ADAPTERS_MOUNT}/{a.name}", "strength": a.strength} for a in d.adapters]
    _set_env(chat, "KAIFLOW_ADAPTERS", value=json.dumps(spec))
    return manifest


def with_gpus(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    if d.gpus <= 0:
        return manifest
    resources = _chat(manifest).setdefault("resources", {})
    resources.setdefault("requests", {})[GPU_RESOURCE] = str(d.gpus)
    resources.setdefault("limits", {})[GPU_RESOURCE] = str(d.gpus)
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
        _set_env(_chat(manifest), "KAIFLOW_API_KEY", valueFrom={
            "secretKeyRef": {"name": d.api_key_secret, "key": API_KEY_SECRET_KEY}})
    return manifest


def with_model_access_secret(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """Gated models: Kaito's ``presetOptions.modelAccessSecret`` gives the Hub token as ``HF_TOKEN``."""
    if d.model_access_secret:
        _set_env(_chat(manifest), MODEL_ACCESS_SECRET_KEY, valueFrom={  # the Hub reads the variable of the key's name
            "secretKeyRef": {"name": d.model_access_secret, "key": MODEL_ACCESS_SECRET_KEY}})
    return manifest


def with_owner(manifest: dict[str, Any], d: ClusterDeployment) -> dict[str, Any]:
    """Deleting the Workspace deletes what serves it (garbage collection by owner reference)."""
    if d.workspace_uid:
        manifest["metadata"]["ownerReferences"] = [{
            "apiVersion": WORKSPACE_API_VERSION, "kind": "Workspace", "name": d.workspace_name,
            "uid": d.workspace_uid, "controller": True, "blockOwnerDeletion": True,
        }]
    return manifest


DEPLOYMENT_MODIFIERS = (
    with_scratch_space, with_resources, with_probes, with_adapters, with_gpus, with_node_selector, with_api_key,
    with_model_access_secret, with_owner,
    with_security_context,  # last: it covers every container, the init container included
)


def render_deployment(d: ClusterDeployment) -> dict[str, Any]:
    manifest = base_deployment(d)
    for modify in DEPLOYMENT_MODIFIERS:
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


def _gib(quantity: str) -> int:
    """Whole GiB of a Kubernetes quantity written in Gi, G, Mi or M (rounded up)."""
    units = {"Gi": GIB, "G": 10**9, "Mi": 2**20, "M": 10**6, "Ti": 2**40, "T": 10**12}
    for suffix in sorted(units, key=len, reverse=True):
        if quantity.endswith(suffix) and quantity[: -len(suffix)].replace(".", "", 1).isdigit():
            return math.ceil(float(quantity[: -len(suffix)]) * units[suffix] / GIB)
    raise ValueError(f"{quantity!r} is not a quantity in Gi, G, Mi, M, Ti or T")
