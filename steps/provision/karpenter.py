"""The ``karpenter`` provider: Karpenter NodeClaims, the way Kaito's own provisioner does it.

For each missing node one ``karpenter.sh/v1`` NodeClaim is created. Karpenter (on AKS: Kaito's
gpu-provisioner, which turns each claim into an agent pool named after it) launches the VM and
reports back in the claim's status. The claim carries:

* requirements: the instance type (``node.kubernetes.io/instance-type``), the node pool and OS,
  and every ``--label`` as a single-valued requirement, so the node is labelled with it;
* the claim's own labels: the Workspace's (``kaito.sh/workspace``, ``kaito.sh/workspacenamespace``)
  plus ``--label``s;
* the GPU taint ``sku=gpu:NoSchedule`` (only pods that tolerate it land there);
* an owner annotation (NodeClaims are cluster-scoped, so no ownerReference to the namespaced
  Workspace is possible) and ``karpenter.sh/do-not-disrupt`` so a training job is not consolidated.

Idempotent: claim names are stable (``base.pool_safe_name``); a new claim is created (POST), an
existing one is reused only when its owner annotation names this Workspace (another Workspace's or
Kaito's claim of that name is refused, exit 2 naming both) and it asks for the same instance type
(Karpenter treats a claim's spec as immutable); it is then re-applied with server-side apply
(field manager ``kaiflow``), so a retried step converges on the same claims. Then it waits with a deadline until
every claim has ``Ready=True`` and reports ``status.nodeName``. A claim that reports
``Launched=False`` (e.g. no capacity or quota) is deleted before failing (exit code 1, which the
pipeline retries), so the retry asks afresh instead of finding the failed claim again.

Preferred nodes that exist, are Ready and carry the labels count towards ``--count`` (as in Kaito).

``release()`` deletes the Workspace's claims — those labelled with its name and namespace *and*
carrying its owner annotation, so a claim Kaito's own controller made is never touched — and
waits until Karpenter's termination finalizer has let them go (the node drained and the VM gone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from api.labels import (
    ANNOTATION_OWNER, GPU_TAINT, LABEL_INSTANCE_TYPE, LABEL_KARPENTER_NODEPOOL, LABEL_MANAGED_BY, LABEL_WORKSPACE, LABEL_WORKSPACE_NAMESPACE,
    MANAGED_BY,
)
from stepkit import kube
from stepkit.common import RetryableError, StepError, report_progress
from steps.provision.base import Provider, ProvisionConfig, ProvisionResult, ready_preferred_nodes, pool_safe_name, wait_until

log = logging.getLogger("kaiflow.steps.provision.karpenter")

API_VERSION, KIND = "karpenter.sh/v1", "NodeClaim"


@dataclass(frozen=True)
class KarpenterOptions:
    node_class: str = field(default="default", metadata={"help": "name of the node class the claims reference"})
    node_class_kind: str = field(default="AKSNodeClass", metadata={"help": "kind of the node class"})
    node_class_group: str = field(default="karpenter.azure.com", metadata={"help": "API group of the node class"})
    node_pool: str = field(default="kaito", metadata={"help": "value of the karpenter.sh/nodepool requirement"})
    disk_size: str = field(default="120Gi", metadata={"help": "OS disk size requested per node (resources.requests.storage)"})


def nodeclaim_body(config: ProvisionConfig, options: KarpenterOptions, name: str) -> dict[str, Any]:
    labels = {  # kaiflow's last: a --label never overrides them (validate refuses those keys too)
        **config.labels,
        LABEL_WORKSPACE: config.workspace_name,
        LABEL_WORKSPACE_NAMESPACE: config.namespace,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_KARPENTER_NODEPOOL: options.node_pool,
    }
    requirements = [
        {"key": LABEL_INSTANCE_TYPE, "operator": "In", "values": [config.instance_type]},
        {"key": LABEL_KARPENTER_NODEPOOL, "operator": "In", "values": [options.node_pool]},
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
    ] + [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(config.labels.items())]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {ANNOTATION_OWNER: config.owner, "karpenter.sh/do-not-disrupt": "true"},
        },
        "spec": {
            "nodeClassRef": {"group": options.node_class_group, "kind": options.node_class_kind, "name": options.node_class},
            "requirements": requirements,
            "taints": [dict(GPU_TAINT)],
            "resources": {"requests": {"storage": options.disk_size}},
        },
    }


def _instance_type_of(claim: dict[str, Any]) -> str | None:
    for req in (claim.get("spec") or {}).get("requirements") or []:
        if req.get("key") == LABEL_INSTANCE_TYPE and req.get("values"):
            return req["values"][0]
    return None


def _condition(claim: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (claim.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return {}


class KarpenterProvider(Provider):
    name = "karpenter"
    options_class = KarpenterOptions

    def provision(self) -> ProvisionResult:
        from kubernetes import client

        config, options = self.config, self.options or KarpenterOptions()
        if not config.instance_type:
            raise StepError("--instance-type is required for provider karpenter (the VM size each NodeClaim asks for)")
        with kube.api_client(config.kubeconfig) as api:
            reused = ready_preferred_nodes(client.CoreV1Api(api), config)
            claims = [pool_safe_name(config.workspace_name, config.namespace, i) for i in range(config.count - len(reused))]
            if not config.wait_only:
                for name in claims:
                    self._apply(api, nodeclaim_body(config, options, name))

            states: dict[str, str] = {}

            def all_ready() -> list[str]:
                nodes = []
                for name in claims:
                    node = self._check(api, name, states)
                    if node:
                        nodes.append(node)
                report_progress(len(reused) + len(nodes), config.count)
                return nodes if len(nodes) == len(claims) else []

            def describe() -> str:
                return "; ".join(f"{name}: {state}" for name, state in states.items())

            nodes = wait_until(all_ready, timeout=config.timeout, interval=config.poll_interval,
                               what=f"NodeClaims {', '.join(claims)} to become Ready", describe=describe) if claims else []
        log.info("nodes ready: %s", ", ".join(reused + nodes))
        return ProvisionResult(provider=self.name, nodes=reused + nodes,
                               details={"nodeclaims": claims, "preferred_nodes_used": reused})

    def request(self) -> list[str]:
        """Create or re-apply the Workspace's claims without waiting (the operator's side).

        A claim of ours that failed to launch is deleted, so the next request makes it afresh.
        """
        from kubernetes import client

        config, options = self.config, self.options or KarpenterOptions()
        if not config.instance_type:
            raise StepError("--instance-type is required for provider karpenter (the VM size each NodeClaim asks for)")
        with kube.api_client(config.kubeconfig) as api:
            reused = ready_preferred_nodes(client.CoreV1Api(api), config)
            claims = [pool_safe_name(config.workspace_name, config.namespace, i) for i in range(config.count - len(reused))]
            for name in claims:
                existing = kube.get(api, API_VERSION, KIND, name)
                if (existing is not None and _condition(existing, "Launched").get("status") == "False"
                        and ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OWNER) == config.owner):
                    kube.delete(api, API_VERSION, KIND, name)
                    log.info("NodeClaim %s failed to launch; deleted it, the next request makes it afresh", name)
                    continue
                self._apply(api, nodeclaim_body(config, options, name))
        return claims

    def _apply(self, api: Any, body: dict[str, Any]) -> None:
        """Create the claim, or re-apply ours; never adopt a claim another Workspace (or Kaito) owns.

        A new claim is created with POST, so a claim someone made meanwhile answers 409 instead of
        being overwritten; an existing one is re-applied (server-side apply) only when its owner
        annotation names this Workspace and it asks for the same instance type.
        """
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        existing = kube.get(api, API_VERSION, KIND, name)
        if existing is None:
            try:
                kube.request(api, "POST", kube.resource_path(API_VERSION, KIND), body=body)
                log.info("created NodeClaim %s (%s)", name, self.config.instance_type)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise kube.api_error(exc, f"applying NodeClaim {name} (create)") from None
            existing = kube.get(api, API_VERSION, KIND, name)
            if existing is None:
                raise RetryableError(f"NodeClaim {name} was created and deleted meanwhile; retry")
        owner = ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OWNER)
        if owner != self.config.owner:
            raise StepError(
                f"--workspace-name: NodeClaim {name} belongs to {owner or 'no kaiflow Workspace (no owner annotation)'}, "
                f"not to {self.config.owner}: a name clash; not adopting it (rename the Workspace, or delete the "
                f"claim if it is stale: kubectl delete nodeclaim {name})"
            )
        if (existing.get("metadata") or {}).get("deletionTimestamp"):
            raise RetryableError(f"NodeClaim {name} is being deleted; retry once it is gone")
        found = _instance_type_of(existing)
        if found != self.config.instance_type:
            raise StepError(
                f"--instance-type: NodeClaim {name} already exists with instance type {found}, not "
                f"{self.config.instance_type}; delete it (kubectl delete nodeclaim {name}) to change the size"
            )
        kube.server_side_apply(api, body)
        log.info("reusing NodeClaim %s (%s)", name, self.config.instance_type)

    def _check(self, api: Any, name: str, states: dict[str, str]) -> str | None:
        """The node name once the claim is Ready; fails for a claim that cannot launch."""
        claim = kube.get(api, API_VERSION, KIND, name)
        if claim is None:
            if self.config.wait_only:
                states[name] = "not requested yet (the kaiflow operator creates it)"
                return None
            raise RetryableError(f"NodeClaim {name} disappeared while waiting (deleted by Karpenter or a user)")
        launched, ready = _condition(claim, "Launched"), _condition(claim, "Ready")
        if launched.get("status") == "False":
            reason = launched.get("reason") or "unknown reason"
            message = launched.get("message") or ""
            if not self.config.wait_only:  # with --wait-only the operator deletes it (request())
                try:
                    kube.delete(api, API_VERSION, KIND, name)
                except StepError as exc:
                    log.warning("could not delete failed NodeClaim %s: %s", name, exc)
            raise RetryableError(f"NodeClaim {name} failed to launch a {self.config.instance_type} node: {reason} {message}".rstrip())
        node = (claim.get("status") or {}).get("nodeName")
        if ready.get("status") == "True" and node:
            states[name] = f"Ready on {node}"
            return node
        pending = [c for c in ("Launched", "Registered", "Initialized", "Ready") if _condition(claim, c).get("status") != "True"]
        states[name] = f"waiting for {', '.join(pending)}"
        return None

    def release(self) -> list[str]:
        config = self.config
        with kube.api_client(config.kubeconfig) as api:
            claims = self._owned_claims(api)
            for name in claims:
                if kube.delete(api, API_VERSION, KIND, name):
                    log.info("deleting NodeClaim %s", name)
            remaining: list[str] = []

            def gone() -> bool:
                remaining[:] = self._owned_claims(api)
                return not remaining

            if claims:
                wait_until(gone, timeout=config.timeout, interval=config.poll_interval,
                           what=f"NodeClaims {', '.join(claims)} to be deleted",
                           describe=lambda: f"still there: {', '.join(remaining)} (Karpenter drains the node first)")
        return claims

    def _owned_claims(self, api: Any) -> list[str]:
        """Names of this Workspace's NodeClaims: its labels, and kaiflow's owner annotation."""
        from kubernetes.client.exceptions import ApiException

        config = self.config
        selector = f"{LABEL_WORKSPACE}={config.workspace_name},{LABEL_WORKSPACE_NAMESPACE}={config.namespace}"
        try:
            found = kube.request(api, "GET", kube.resource_path(API_VERSION, KIND), query=[("labelSelector", selector)])
        except ApiException as exc:
            if exc.status == 404:  # no NodeClaim CRD: nothing of ours can exist
                return []
            raise kube.api_error(exc, f"listing NodeClaims with {selector}") from None
        return sorted(
            item["metadata"]["name"] for item in (found or {}).get("items") or []
            if ((item.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OWNER) == config.owner
        )
