"""The ``aks`` provider: one AKS agent pool per Workspace, through the Azure SDK.

``agent_pools.begin_create_or_update`` with the pool's whole desired state — VM size, count, mode
User, Linux, node labels (the Workspace's plus ``--label``s), the GPU taint ``sku=gpu:NoSchedule``
and an owner tag — then the long-running operation is followed to its end (azure-core's poller
understands both the ``Azure-AsyncOperation`` and the provisioningState flows). PUT is
idempotent, so a retried step converges on the same pool; AKS itself refuses changes it cannot
make (e.g. another VM size for an existing pool), which is reported naming ``--instance-type``.
An existing pool of that name is first read: unless its owner tag names this Workspace it is
never rewritten (exit 2 naming both Workspaces).

Credentials are only referenced: ``DefaultAzureCredential`` picks workload identity in a pod
(``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/``AZURE_FEDERATED_TOKEN_FILE`` injected by the webhook),
or a managed identity, or a developer's ``az login``. Nothing secret is accepted on the command
line or logged. ``--arm-endpoint`` and ``--ca-bundle`` point the client at another ARM endpoint
(sovereign clouds, tests); the token scope follows the endpoint.

Transient ARM errors (429, 5xx, connection resets) are retried by azure-core's RetryPolicy with
exponential backoff and ``Retry-After``; what still fails that way, or for lack of capacity
(``AllocationFailed``, ``OverconstrainedAllocationRequest``...), exits with code 1 so the
pipeline retries the step; quota, invalid settings and refused changes exit with 2. With ``--wait-for-nodes`` (default) the step then waits
for the pool's nodes (label ``agentpool=<pool>``) to be Ready in Kubernetes and reports their
names; without it the node list is empty and only the pool is reported.

``release()`` deletes the pool (``agent_pools.begin_delete``, followed to its end under
``--timeout``) after checking its owner tag names this Workspace: a pool of the same name that
kaiflow did not make for it is refused (exit 2), a pool already gone is fine.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from api.labels import ANNOTATION_OWNER, GPU_TAINT, LABEL_AKS_AGENTPOOL, LABEL_WORKSPACE, LABEL_WORKSPACE_NAMESPACE
from stepkit import kube
from stepkit.common import RetryableError, StepError, report_progress
from steps.provision.base import Provider, ProvisionResult, node_is_ready, pool_safe_name, wait_until

log = logging.getLogger("kaiflow.steps.provision.aks")

_POOL_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
# ARM tag names may not contain "/".
OWNER_TAG = ANNOTATION_OWNER.replace("/", "_")
AKS_ENV = {
    "subscription_id": "AZURE_SUBSCRIPTION_ID",
    "resource_group": "AZURE_RESOURCE_GROUP",
    "cluster_name": "AZURE_CLUSTER_NAME",
    "arm_endpoint": "AZURE_RESOURCE_MANAGER_ENDPOINT",
}


@dataclass(frozen=True)
class AKSOptions:
    subscription_id: str | None = field(default=None, metadata={"help": "Azure subscription of the AKS cluster"})
    resource_group: str | None = field(default=None, metadata={"help": "resource group of the AKS cluster"})
    cluster_name: str | None = field(default=None, metadata={"help": "name of the AKS cluster"})
    pool_name: str | None = field(
        default=None, metadata={"help": "agent pool name (default: derived from the Workspace; ≤ 12 lowercase alphanumerics)"}
    )
    arm_endpoint: str | None = field(
        default=None, metadata={"help": "Azure Resource Manager endpoint (default: https://management.azure.com)"}
    )
    ca_bundle: str | None = field(default=None, metadata={"help": "CA bundle that verifies the ARM endpoint's TLS certificate"})
    wait_for_nodes: bool = field(
        default=True, metadata={"help": "after the pool succeeds, wait for its nodes to be Ready in Kubernetes"}
    )
    os_disk_size_gb: int = field(default=128, metadata={"help": "OS disk size of each node in GB"})

    ENV: ClassVar[dict[str, str]] = AKS_ENV  # environment variables that supply defaults


def agent_pool_spec(provider: AKSProvider, pool: str) -> dict[str, Any]:
    config = provider.config
    return dict(
        vm_size=config.instance_type,
        count=config.count,
        mode="User",
        os_type="Linux",
        os_disk_size_gb=provider.opts.os_disk_size_gb,
        enable_auto_scaling=False,
        node_labels={**config.labels, LABEL_WORKSPACE: config.workspace_name, LABEL_WORKSPACE_NAMESPACE: config.namespace},
        node_taints=[f"{GPU_TAINT['key']}={GPU_TAINT['value']}:{GPU_TAINT['effect']}"],
        tags={OWNER_TAG: config.owner},
    )


class AKSProvider(Provider):
    name = "aks"
    options_class = AKSOptions

    @property
    def opts(self) -> AKSOptions:
        return self.options or AKSOptions()

    def _validate(self, *, need_instance_type: bool = True) -> str:
        config, opts = self.config, self.opts
        if need_instance_type and not config.instance_type:
            raise StepError("--instance-type is required for provider aks (the agent pool's VM size)")
        for name, env in (("subscription_id", "AZURE_SUBSCRIPTION_ID"), ("resource_group", "AZURE_RESOURCE_GROUP"),
                          ("cluster_name", "AZURE_CLUSTER_NAME")):
            if not getattr(opts, name):
                raise StepError(f"--{name.replace('_', '-')} (or ${env}) is required for provider aks")
        if not _GUID.match(opts.subscription_id or ""):
            raise StepError(f"--subscription-id: {opts.subscription_id!r} is not a subscription GUID")
        pool = opts.pool_name or pool_safe_name(config.workspace_name, config.namespace)
        if not _POOL_NAME.match(pool):
            raise StepError(f"--pool-name: {pool!r} must be 1-12 lowercase letters/digits starting with a letter")
        if opts.arm_endpoint and not opts.arm_endpoint.startswith("https://"):
            raise StepError(f"--arm-endpoint: {opts.arm_endpoint!r} must be an https:// URL (ARM refuses tokens over http)")
        if opts.ca_bundle:
            if not Path(opts.ca_bundle).is_file():
                raise StepError(f"--ca-bundle: {opts.ca_bundle} is not a file")
        return pool

    def _client(self) -> Any:
        from azure.identity import DefaultAzureCredential
        from azure.mgmt.containerservice import ContainerServiceClient

        opts = self.opts
        kwargs: dict[str, Any] = {}
        if opts.arm_endpoint:
            endpoint = opts.arm_endpoint.rstrip("/")
            kwargs.update(base_url=endpoint, credential_scopes=[f"{endpoint}/.default"])
        if opts.ca_bundle:
            kwargs["connection_verify"] = opts.ca_bundle
        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        return ContainerServiceClient(credential, opts.subscription_id, **kwargs)

    def provision(self) -> ProvisionResult:
        from azure.mgmt.containerservice.models import AgentPool

        if self.config.wait_only:
            # The operator made the pool (request()); the pod has no Azure identity: wait in Kubernetes.
            pool_name = self.opts.pool_name or pool_safe_name(self.config.workspace_name, self.config.namespace)
            if not _POOL_NAME.match(pool_name):
                raise StepError(f"--pool-name: {pool_name!r} must be 1-12 lowercase letters/digits starting with a letter")
            nodes = self._wait_for_nodes(pool_name, self.config.timeout)
            return ProvisionResult(provider=self.name, nodes=nodes, details={"agent_pool": pool_name})
        pool_name = self._validate()
        _quiet_azure_logs()
        config, opts = self.config, self.opts
        where = f"{opts.resource_group}/{opts.cluster_name}"
        deadline = time.monotonic() + config.timeout
        spec = agent_pool_spec(self, pool_name)
        if config.preferred_nodes:
            log.info("aks provider: the pool gets all %d node(s); preferred nodes are not counted", config.count)
        log.info("creating or updating agent pool %s in %s: %d x %s", pool_name, where, config.count, config.instance_type)
        try:
            with self._client() as aks:
                self._refuse_a_strangers_pool(aks, pool_name, where)
                poller = aks.agent_pools.begin_create_or_update(
                    opts.resource_group, opts.cluster_name, pool_name, AgentPool(**spec),
                    polling_interval=config.poll_interval,
                )
                poller.wait(timeout=config.timeout)
                if not poller.done():
                    raise StepError(f"timed out after {config.timeout:g} s waiting for agent pool {pool_name} in {where} "
                                    f"(status {poller.status()})")
                pool = poller.result()
        except Exception as exc:
            field_hint = " (--instance-type)" if "vmsize" in str(exc).lower() or "sku" in str(exc).lower() else ""
            raise _arm_error(exc, where, f"agent pool {pool_name} in {where}{field_hint}") from None
        state = getattr(pool, "provisioning_state", None)
        if state not in (None, "Succeeded"):
            raise StepError(f"agent pool {pool_name} in {where} ended in provisioningState {state}")
        log.info("agent pool %s: %s, %s x %s", pool_name, state, pool.count, pool.vm_size)
        details = {"agent_pool": pool_name, "cluster": where, "vm_size": pool.vm_size, "count": pool.count}
        if not opts.wait_for_nodes:
            return ProvisionResult(provider=self.name, nodes=[], details=details)
        nodes = self._wait_for_nodes(pool_name, max(1.0, deadline - time.monotonic()))
        return ProvisionResult(provider=self.name, nodes=nodes, details=details)

    def request(self) -> list[str]:
        """Create or update the pool without following the operation (the operator's side).

        A pool of ours that already has this size and count, and is not failed, is left alone (no
        second PUT while AKS is still working on the first).
        """
        from azure.mgmt.containerservice.models import AgentPool

        pool_name = self._validate()
        _quiet_azure_logs()
        config, opts = self.config, self.opts
        where = f"{opts.resource_group}/{opts.cluster_name}"
        try:
            with self._client() as aks:
                existing = self._refuse_a_strangers_pool(aks, pool_name, where)
                if (existing is not None and existing.vm_size == config.instance_type and existing.count == config.count
                        and getattr(existing, "provisioning_state", None) not in ("Failed", "Canceled")):
                    return [pool_name]
                log.info("requesting agent pool %s in %s: %d x %s", pool_name, where, config.count, config.instance_type)
                aks.agent_pools.begin_create_or_update(opts.resource_group, opts.cluster_name, pool_name,
                                                       AgentPool(**agent_pool_spec(self, pool_name)),
                                                       polling_interval=config.poll_interval)
        except Exception as exc:
            field_hint = " (--instance-type)" if "vmsize" in str(exc).lower() or "sku" in str(exc).lower() else ""
            raise _arm_error(exc, where, f"agent pool {pool_name} in {where}{field_hint}") from None
        return [pool_name]

    def _refuse_a_strangers_pool(self, aks: Any, pool_name: str, where: str) -> Any:
        """A pool of this name that another Workspace (or anyone but kaiflow for this one) owns is
        never rewritten: its count, labels and owner tag stay, and the step exits 2 naming both."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            existing = aks.agent_pools.get(self.opts.resource_group, self.opts.cluster_name, pool_name)
        except ResourceNotFoundError as exc:
            if _arm_code(exc) == "NotFound":
                return None
            raise
        owner = (existing.tags or {}).get(OWNER_TAG)
        if owner != self.config.owner:
            raise StepError(
                f"--pool-name: agent pool {pool_name} in {where} belongs to "
                f"{owner or 'no kaiflow Workspace (no ' + OWNER_TAG + ' tag)'}, not to {self.config.owner}: "
                f"a name clash; not adopting it (set --pool-name, or rename the Workspace)"
            )
        return existing

    def _wait_for_nodes(self, pool_name: str, timeout: float) -> list[str]:
        from kubernetes import client

        config = self.config
        selector = f"{LABEL_AKS_AGENTPOOL}={pool_name}"
        seen: dict[str, list[str]] = {"ready": [], "all": []}
        with kube.api_client(config.kubeconfig) as api:
            core = client.CoreV1Api(api)

            def ready() -> list[str]:
                try:
                    nodes = core.list_node(label_selector=selector).items
                except client.ApiException as exc:
                    raise kube.api_error(exc, f"listing nodes of agent pool {pool_name}") from None
                seen["all"] = sorted(n.metadata.name for n in nodes)
                seen["ready"] = sorted(n.metadata.name for n in nodes if node_is_ready(n))
                report_progress(min(len(seen["ready"]), config.count), config.count)
                return seen["ready"][: config.count] if len(seen["ready"]) >= config.count else []

            return wait_until(
                ready, timeout=timeout, interval=config.poll_interval, what=f"{config.count} Ready node(s) with {selector}",
                describe=lambda: f"{len(seen['ready'])} Ready of {len(seen['all'])} registered",
            )


    def release(self) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        pool_name = self._validate(need_instance_type=False)
        _quiet_azure_logs()
        config, opts = self.config, self.opts
        where = f"{opts.resource_group}/{opts.cluster_name}"
        try:
            with self._client() as aks:
                try:
                    pool = aks.agent_pools.get(opts.resource_group, opts.cluster_name, pool_name)
                except ResourceNotFoundError as exc:
                    # AKS answers a missing pool with code NotFound; a missing cluster or resource
                    # group has codes of their own and is an error.
                    if _arm_code(exc) == "NotFound":
                        log.info("agent pool %s in %s is already gone", pool_name, where)
                        return []
                    raise
                owner = (pool.tags or {}).get(OWNER_TAG)
                if owner != config.owner:
                    raise StepError(
                        f"--pool-name: agent pool {pool_name} in {where} is not the one kaiflow made for "
                        f"{config.owner} (its {OWNER_TAG} tag is {owner!r}); not deleting it"
                    )
                log.info("deleting agent pool %s in %s", pool_name, where)
                poller = aks.agent_pools.begin_delete(opts.resource_group, opts.cluster_name, pool_name,
                                                      polling_interval=config.poll_interval)
                poller.wait(timeout=config.timeout)
                if not poller.done():
                    raise RetryableError(f"timed out after {config.timeout:g} s waiting for agent pool {pool_name} "
                                         f"in {where} to be deleted (status {poller.status()})")
                poller.result()
        except Exception as exc:
            raise _arm_error(exc, where, f"deleting agent pool {pool_name} in {where}") from None
        return [pool_name]


def _quiet_azure_logs() -> None:
    if not os.environ.get("KAIFLOW_DEBUG"):
        # azure-core logs every request and response header at INFO; keep the step's log readable.
        logging.getLogger("azure").setLevel(logging.WARNING)


def _arm_error(exc: Exception, where: str, what: str) -> Exception:
    """One mapping of Azure SDK errors to step errors for every ARM call (``what`` prefixes HTTP errors).

    StepErrors raised inside the block (timeouts, a stranger's pool) pass through unchanged.
    """
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
    )

    if isinstance(exc, StepError):
        return exc
    if isinstance(exc, ClientAuthenticationError):
        return _credential_error(exc)
    if isinstance(exc, ResourceNotFoundError):
        return StepError(f"--cluster-name/--resource-group/--subscription-id: AKS cluster {where} not found: "
                         f"{_arm_message(exc)}")
    if isinstance(exc, HttpResponseError):
        return (RetryableError if _transient(exc) else StepError)(f"{what}: {_arm_message(exc)}")
    if isinstance(exc, ServiceRequestError):
        return RetryableError(f"--arm-endpoint: cannot reach Azure Resource Manager: {exc}")
    return exc


def _credential_error(exc: Exception) -> StepError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StepError(
        "Azure credentials: no usable credential (in a pod: workload identity needs the "
        f"azure.workload.identity/use label and a federated service account): {first_line}"
    )


def _arm_code(exc: Any) -> str:
    return str(getattr(getattr(exc, "error", None), "code", "") or "")


def _transient(exc: Any) -> bool:
    """Whether another attempt later may succeed: throttling, server errors, no capacity right now.

    Quota, invalid parameters and forbidden changes stay as they are until a person acts.
    """
    status = getattr(exc, "status_code", None)
    if status is not None and (status == 429 or status >= 500):
        return True
    code = str(getattr(getattr(exc, "error", None), "code", "") or "")
    return any(word in code for word in ("Allocation", "Capacity", "Throttl", "Timeout", "InternalServerError"))


def _arm_message(exc: Any) -> str:
    error = getattr(exc, "error", None)
    if error is not None and getattr(error, "code", None):
        return f"{error.code}: {error.message}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
