"""The steps' one way to the Kubernetes API: client, server-side apply, error mapping.

Provision, deploy and the controller share it, so credentials, retries and the meaning of an API
error are decided once.

Credentials follow the usual order: ``--kubeconfig``, then ``$KUBECONFIG``, then
``~/.kube/config``, then the pod's service account. Transient errors (connection resets, 429,
5xx) are retried by urllib3 with exponential backoff, honouring ``Retry-After``; a retried create
that already happened answers 409, which callers treat as "reuse".

Objects are written with server-side apply (``PATCH`` with ``application/apply-patch+yaml``,
field manager ``kaiflow``, ``force=true``): one idempotent request whether the object exists or
not, and the API server merges only the fields kaiflow owns, so a field another controller set
(an HPA's replicas, a label an admin added) stays.

Errors become step errors with the exit-code policy of :mod:`stepkit.common`: 429, 5xx and
unreachable servers may pass (``RetryableError``, exit 1); other answers will not (``StepError``,
exit 2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions

from api.labels import FIELD_MANAGER
from stepkit.common import RetryableError, StepError

T = TypeVar("T")

# kubernetes is imported inside the functions that use it: ``import kubernetes.client`` takes
# about 0.6 s (measured on the 2-core dev machine, against 0.07 s for the bare interpreter), which
# every importer that never calls the API would pay (deploy --mode local, the CLI's stop).

# Plurals of the kinds kaiflow writes; anything else falls back to the lowercased kind + "s".
_PLURALS = {
    "Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps", "Secret": "secrets",
    "ServiceAccount": "serviceaccounts", "Workflow": "workflows", "CronWorkflow": "cronworkflows",
    "WorkflowTemplate": "workflowtemplates", "NodeClaim": "nodeclaims", "NodePool": "nodepools",
    "Workspace": "workspaces", "Namespace": "namespaces", "Node": "nodes", "Event": "events",
    "PersistentVolumeClaim": "persistentvolumeclaims", "Role": "roles", "RoleBinding": "rolebindings",
}
_CLUSTER_SCOPED = {"NodeClaim", "NodePool", "Namespace", "Node", "ClusterRole", "ClusterRoleBinding",
                   "CustomResourceDefinition"}


def api_client(kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient`` with retries on transient errors (see the module doc)."""
    from kubernetes import client, config
    from urllib3.util.retry import Retry

    configuration = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path and Path("~/.kube/config").expanduser().exists():
        path = str(Path("~/.kube/config").expanduser())
    try:
        if path:
            config.load_kube_config(config_file=path, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = f"kubeconfig {path}" if path else "the in-cluster service account"
        raise StepError(f"--kubeconfig: cannot load Kubernetes credentials from {where}: {exc}") from None
    configuration.retries = Retry(
        total=6, connect=6, read=3, status=6, backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None, raise_on_status=False,
    )
    return client.ApiClient(configuration)


def api_error(exc: Exception, what: str) -> StepError:
    """A one-line StepError from a kubernetes-client exception (status and the server's message).

    429, 5xx and errors without an HTTP status (refused or reset connections after the client's
    own retries) are ``RetryableError``; other answers (400, 401, 403, 404, 409, 422) are not.
    """
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    message = ""
    if body:
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:300]
    if status == 403:
        hint = " (does the step's service account have RBAC for it?)"
    elif status == 404 and "nodeclaim" in what.lower():
        hint = " (is Karpenter / Kaito's gpu-provisioner installed?)"
    else:
        hint = ""
    detail = f"HTTP {status} {message}".strip() if status else f"{type(exc).__name__}: {exc}"
    transient = not status or status == 429 or status >= 500
    return (RetryableError if transient else StepError)(f"{what}: {detail}{hint}")


def resource_path(api_version: str, kind: str, name: str | None = None, namespace: str | None = None) -> str:
    """The REST path of an object (or of its collection when ``name`` is None)."""
    group, _, version = api_version.rpartition("/")
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    plural = _PLURALS.get(kind, kind.lower() + "s")
    scope = "" if kind in _CLUSTER_SCOPED or not namespace else f"/namespaces/{namespace}"
    return f"{base}{scope}/{plural}" + (f"/{name}" if name else "")


def describe(manifest: dict[str, Any]) -> str:
    meta = manifest.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{manifest.get('kind', 'object')} {where}{meta.get('name', '?')}"


def server_side_apply(client: Any, manifest: dict[str, Any], *, field_manager: str = FIELD_MANAGER,
                      force: bool = True, subresource: str | None = None) -> dict[str, Any]:
    """Apply ``manifest`` (a dict with apiVersion, kind, metadata.name[, namespace]); the object as stored.

    Raises the ``StepError``/``RetryableError`` of :func:`api_error` on failure.
    """
    from kubernetes.client.exceptions import ApiException

    meta = manifest.get("metadata", {})
    path = resource_path(manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace"))
    if subresource:
        path += f"/{subresource}"
    query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
    try:
        return request(client, "PATCH", path, body=manifest, query=query,
                       content_type="application/apply-patch+yaml")
    except ApiException as exc:
        raise api_error(exc, f"applying {describe(manifest)}") from None
    except Exception as exc:  # urllib3 errors once the client's own retries are spent
        if is_unreachable(exc):
            raise unreachable_error(exc, f"applying {describe(manifest)}") from None
        raise


def request(client: Any, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
            content_type: str = "application/json") -> Any:
    """One raw API call through ``client`` (auth, TLS and retries as configured); the decoded JSON."""
    serialized = client.param_serialize(
        method=method, resource_path=path, query_params=query or [], body=body,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = client.call_api(*serialized)
    response.read()
    # Non-2xx answers raise ApiException here, as the generated API methods do.
    return client.response_deserialize(response_data=response, response_types_map={"2XX": "object"}).data


def get(client: Any, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The object, or None when it does not exist; other errors as :func:`api_error`."""
    from kubernetes.client.exceptions import ApiException

    try:
        return request(client, "GET", resource_path(api_version, kind, name, namespace))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise api_error(exc, f"reading {kind} {namespace + '/' if namespace else ''}{name}") from None


def delete(client: Any, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
    """Delete the object (background propagation); False when it was already gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        request(client, "DELETE", resource_path(api_version, kind, name, namespace),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise api_error(exc, f"deleting {kind} {namespace + '/' if namespace else ''}{name}") from None


def is_unreachable(exc: BaseException) -> bool:
    """The API server could not be reached (urllib3 gave up after the client's own retries): the one
    place that decides it, for the steps (exit 1, retried) and the controller (a TemporaryError)."""
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def unreachable_error(exc: BaseException, what: str = "") -> RetryableError:
    return RetryableError(f"{what + ': ' if what else ''}cannot reach the Kubernetes API: {exc}")


def retry_if_unreachable(operation: Callable[[], T]) -> T:
    """``operation()``, with an unreachable API server turned into a ``RetryableError``."""
    try:
        return operation()
    except Exception as exc:
        if is_unreachable(exc):
            raise unreachable_error(exc) from None
        raise
