"""``python -m steps.deploy --mode cluster``: roll the chat service out as a Deployment and a Service.

The manifests come from :mod:`steps.deploy.manifests`. Before writing, the step checks that a
Deployment or Service of the same name is its own — labelled ``app.kubernetes.io/managed-by:
kaiflow`` and ``kaito.sh/workspace: <workspace>`` — and refuses (exit 2, naming the object) to
overwrite anything else. Both are written with server-side apply (field manager ``kaiflow``):
one idempotent request, and fields kaiflow does not set (an admin's annotation, another
controller's label) stay. Then it waits, under ``--ready-timeout``, for the rollout to finish as ``kubectl rollout
status`` judges it: the new generation observed, every replica updated and ready, no old pod
left. The pods' readiness probe is the service's ``/readyz``, so ready means model and adapters
loaded.

Exit codes: a readiness deadline that passes, a Deployment past its progress deadline, a 429/5xx
answer or an unreachable API server exit 1 (``RetryableError``: the pipeline retries the step);
bad flags, someone else's object and other API answers (403, 404, 422, ...) exit 2.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from api.labels import LABEL_MANAGED_BY, LABEL_WORKSPACE, MANAGED_BY
from presets.catalog import UnknownPresetError, get_preset
from presets.sizing import estimate_inference
from stepkit import kube
from stepkit.common import RetryableError, StepError
from steps.deploy.manifests import (
    AdapterImage,
    ClusterDeployment,
    render_deployment,
    render_service,
    service_url,
    sizes_for_weights,
)

log = logging.getLogger("kaiflow.steps.deploy.cluster")

_CPU = re.compile(r"\d+(\.\d+)?m?")
_BYTES = re.compile(r"\d+(\.\d+)?(Mi|M|Gi|G|Ti|T)")  # what steps.deploy.manifests sizes the pod from


@dataclass(frozen=True)
class ClusterOptions:
    namespace: str = field(default="default", metadata={"help": "namespace of the Workspace"})
    image: str = field(default="", metadata={"help": "the kaiflow serving image"})
    workspace_uid: str = field(default="", metadata={"help": "the Workspace's uid (owner reference)"})
    adapter_image: dict[str, str] = field(default_factory=dict, metadata={
        "help": "NAME=IMAGE the init container pulls an adapter from (repeat)", "metavar": "NAME=IMAGE"})
    gpus: int = field(default=1, metadata={"help": "GPUs per pod (nvidia.com/gpu)"})
    replicas: int = field(default=1, metadata={"help": "pods"})
    node_label: dict[str, str] = field(default_factory=dict, metadata={
        "help": "KEY=VALUE of the Workspace's resource.labelSelector.matchLabels (repeat)", "metavar": "KEY=VALUE"})
    docker_config_secret: str = field(default="", metadata={"help": "dockerconfigjson Secret for pulling adapters"})
    api_key_secret: str = field(default="", metadata={
        "help": "Secret whose key 'api-key' becomes the service's bearer key (referenced, never read)"})
    model_access_secret: str = field(default="", metadata={
        "help": "Secret whose key 'HF_TOKEN' lets the pod download a gated model (Kaito's "
                "presetOptions.modelAccessSecret; referenced, never read)"})
    insecure: bool = field(default=False, metadata={"help": "pull adapters over plain http"})
    cpu_request: str = field(default="2", metadata={"help": "CPU request of the chat container"})
    memory_request: str = field(default="", metadata={
        "help": "memory request of the chat container (default: the preset's weights + 4 GiB)"})
    cache_size: str = field(default="", metadata={
        "help": "sizeLimit of the model cache emptyDir (default: the preset's weights + 10 %% + 2 GiB)"})
    startup_timeout: int = field(default=1800, metadata={
        "help": "seconds a pod may take to download and load the model before it is restarted"})
    service_env: dict[str, str] = field(default_factory=dict, metadata={
        "help": "KEY=VALUE setting of the chat service (KAIFLOW_*; e.g. from the Workspace's inference.config); "
                "repeat", "metavar": "KEY=VALUE"})
    kubeconfig: str | None = field(default=None, metadata={
        "help": "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the pod's service account)"})


def cluster_deployment(workspace_name: str, preset: str, strengths: dict[str, float],
                       options: ClusterOptions) -> ClusterDeployment:
    """The manifests' inputs from the flags; StepError naming the flag for bad ones."""

    if not options.image:
        raise StepError("--image is required in cluster mode (the kaiflow serving image)")
    missing = sorted(set(strengths) - set(options.adapter_image))
    if missing:
        raise StepError(f"--adapter {missing[0]}: no --adapter-image {missing[0]}=IMAGE to pull it from")
    if options.gpus < 0:
        raise StepError(f"--gpus: must be >= 0, got {options.gpus}")
    if options.replicas < 1:
        raise StepError(f"--replicas: must be >= 1, got {options.replicas}")
    if options.startup_timeout < 1:
        raise StepError(f"--startup-timeout: must be >= 1, got {options.startup_timeout}")
    try:
        found = get_preset(preset)
    except UnknownPresetError as exc:
        raise StepError(f"--preset: {exc}") from None
    if found.gated and not options.model_access_secret:
        raise StepError(f"--model-access-secret: preset {preset} is gated on the Hugging Face Hub; name the "
                        "Secret holding its HF_TOKEN (the Workspace's presetOptions.modelAccessSecret)")
    if found.sized:
        sizes = sizes_for_weights(estimate_inference(found).parts["weights"])
    elif options.memory_request and options.cache_size:
        sizes = {}
    else:
        # a generic Hugging Face ID: nothing is known offline, the pod learns it from config.json
        raise StepError(f"--preset {preset}: a generic Hugging Face model has no known size here; give "
                        "--memory-request and --cache-size")
    for key in options.service_env:
        if not key.startswith("KAIFLOW_"):
            raise StepError(f"--service-env {key}: only the service's own KAIFLOW_* settings may be set")
    if not _CPU.fullmatch(options.cpu_request):
        raise StepError(f"--cpu-request: {options.cpu_request!r} is not a CPU quantity (e.g. 500m, 2)")
    for flag, value in (("--memory-request", options.memory_request), ("--cache-size", options.cache_size)):
        if value and not _BYTES.fullmatch(value):
            raise StepError(f"{flag}: {value!r} is not a size with a unit (e.g. 512Mi, 16Gi, 20G)")
    adapters = tuple(AdapterImage(name, image, strengths.get(name, 1.0))
                     for name, image in options.adapter_image.items())
    return ClusterDeployment(
        workspace_name=workspace_name, namespace=options.namespace, preset=preset, image=options.image,
        workspace_uid=options.workspace_uid, adapters=adapters, gpus=options.gpus, replicas=options.replicas,
        node_labels=dict(options.node_label), docker_config_secret=options.docker_config_secret,
        api_key_secret=options.api_key_secret, model_access_secret=options.model_access_secret,
        insecure_registry=options.insecure, cpu_request=options.cpu_request,
        memory_request=options.memory_request or sizes["memory_request"],
        cache_size=options.cache_size or sizes["cache_size"], startup_timeout=options.startup_timeout,
        env=dict(options.service_env),
    )


def check_ownership(api: Any, manifest: dict[str, Any], workspace_name: str) -> None:
    """Refuse to overwrite an object of the same name that kaiflow did not make for this Workspace."""
    meta = manifest["metadata"]
    existing = kube.get(api, manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace"))
    if existing is None:
        return
    labels = (existing.get("metadata") or {}).get("labels") or {}
    if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or labels.get(LABEL_WORKSPACE) != workspace_name:
        raise StepError(
            f"{kube.describe(manifest)} already exists and is not kaiflow's for Workspace {workspace_name} "
            f"(labels {LABEL_MANAGED_BY}={labels.get(LABEL_MANAGED_BY)!r}, {LABEL_WORKSPACE}="
            f"{labels.get(LABEL_WORKSPACE)!r}); not touching it: delete or rename it, or rename the Workspace"
        )


def rollout_state(deployment: dict[str, Any], replicas: int) -> tuple[bool, str]:
    """(done, what it waits for), as ``kubectl rollout status`` decides; RetryableError past the progress deadline."""
    meta, status = deployment.get("metadata") or {}, deployment.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise RetryableError(f"Deployment {meta.get('namespace')}/{meta.get('name')}: "
                                 f"{condition.get('message') or 'progress deadline exceeded'}")
    ready = status.get("readyReplicas") or 0
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    if observed is None or (generation is not None and observed < generation):
        return False, f"{ready}/{replicas} replicas ready; the new spec is not observed yet"
    updated, total, available = (status.get(k) or 0 for k in ("updatedReplicas", "replicas", "availableReplicas"))
    if updated < replicas:
        return False, f"{ready}/{replicas} replicas ready; {updated} updated"
    if total > updated:
        return False, f"{ready}/{replicas} replicas ready; {total - updated} old replica(s) still terminating"
    if available < updated or ready < replicas:
        return False, f"{ready}/{replicas} replicas ready"
    return True, f"{ready}/{replicas} replicas ready"


def pod_problems(api: Any, d: ClusterDeployment) -> str:
    """Why the Workspace's pods are not ready, in a line: unschedulable, image pulls, crash loops."""
    from kubernetes.client.exceptions import ApiException

    selector = ",".join(f"{k}={v}" for k, v in d.selector.items())
    try:
        pods = kube.request(api, "GET", kube.resource_path("v1", "Pod", None, d.namespace),
                            query=[("labelSelector", selector)]).get("items") or []
    except Exception as exc:
        if not (isinstance(exc, ApiException) or kube.is_unreachable(exc)):
            raise
        # This only decorates the deadline error being raised: never replace it with another.
        log.debug("cannot list the pods of %s: %s", d.workspace_name, exc)
        return ""
    found = []
    for pod in pods:
        status = pod.get("status") or {}
        reasons = [
            f"{c.get('reason')}: {c.get('message', '')}".rstrip(": ")
            for c in status.get("conditions") or [] if c.get("type") == "PodScheduled" and c.get("status") == "False"
        ]
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in ("ContainerCreating", "PodInitializing"):
                message = (waiting.get("message") or "")[:200]
                reasons.append(f"{container.get('name')} {waiting['reason']}" + (f" ({message})" if message else ""))
        if reasons:
            found.append(f"{pod['metadata']['name']} {'; '.join(reasons)}")
    return ", ".join(found[:3])


def deploy_cluster(d: ClusterDeployment, ready_timeout: float, *, kubeconfig: str | None = None,
                   poll: float = 1.0) -> str:
    """Apply the Deployment and Service, wait for the rollout; the Service's in-cluster URL."""
    deployment, service = render_deployment(d), render_service(d)
    try:
        with kube.api_client(kubeconfig) as api:
            for manifest in (deployment, service):
                check_ownership(api, manifest, d.workspace_name)
            for manifest in (deployment, service):
                kube.server_side_apply(api, manifest)
                log.info("applied %s", kube.describe(manifest))
            deadline = time.monotonic() + ready_timeout
            while True:
                current = kube.get(api, "apps/v1", "Deployment", d.workspace_name, d.namespace)
                if current is None:
                    raise RetryableError(f"Deployment {d.namespace}/{d.workspace_name} disappeared during the rollout")
                done, state = rollout_state(current, d.replicas)
                if done:
                    break
                if time.monotonic() > deadline:
                    # Pods still pulling an image or waiting for a GPU node may well be ready on the next try.
                    problems = pod_problems(api, d)
                    raise RetryableError(f"Deployment {d.namespace}/{d.workspace_name}: {state} after "
                                         f"{ready_timeout:.0f} s" + (f"; pods: {problems}" if problems else ""))
                time.sleep(poll)
    except Exception as exc:
        if kube.is_unreachable(exc):  # the client's own retries could not reach the API server
            raise kube.unreachable_error(exc) from None
        raise
    log.info("Deployment %s/%s rolled out", d.namespace, d.workspace_name)
    return service_url(d.workspace_name, d.namespace)
