"""What every provider shares: the request, the result, the Provider interface and helpers.

A provider turns a ``ProvisionConfig`` (what the Workspace's ``resource`` asks for) into Ready
nodes and reports their names. Like Kaito's node provisioners there is one small interface and
one implementation per file; the step (``__main__``) only picks one and writes the outputs.

Names: the gpu-provisioner turns each Karpenter NodeClaim into an AKS agent pool named after the
claim, and AKS pool names are at most 12 lowercase letters/digits starting with a letter. So
NodeClaims and agent pools are named from sha256(ns/name) alone, as many base-36 characters as the
12 allow (``pool_safe_name``), plus the node index for claims: stable across retries (idempotent)
and unique per namespace/name. A name that exists with another Workspace's owner mark is never
adopted (exit 2 naming both Workspaces).

Kubernetes access, retries and the meaning of an API error are :mod:`stepkit.kube`'s (the steps'
one Kubernetes layer); Kaito's labels, taints and the owner annotation are :mod:`api.labels`'.

Deleting: ``Provider.release()`` removes what ``provision()`` made for a Workspace (the
controller's finalizer and a Workflow's ``onExit`` handler call it through
:func:`steps.provision.release`). It finds its objects by the Workspace's labels and owner
annotation, never by name alone, is idempotent (already gone is fine) and waits under a deadline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from api.labels import owner_annotation, reserved_node_label
from stepkit.common import RetryableError, StepError
from stepkit.kube import api_error

log = logging.getLogger("kaiflow.steps.provision")

PROVIDERS = ("local", "aks", "karpenter", "existing")
CREATING_PROVIDERS = ("aks", "karpenter")  # those that make nodes (and release them)

MAX_COUNT = 100  # node indexes stay within the 12-character AKS pool name

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ProvisionConfig:
    """What to provision: the Workspace's ``resource`` section, plus how long to wait."""

    provider: str = field(metadata={"help": "which provisioner creates the nodes", "choices": PROVIDERS})
    workspace_name: str = field(metadata={"help": "name of the Workspace the nodes are for"})
    namespace: str = field(metadata={"help": "namespace of the Workspace"})
    instance_type: str | None = field(
        default=None, metadata={"help": "VM size / instance type of each node, e.g. Standard_NC24ads_A100_v4"}
    )
    count: int = field(default=1, metadata={"help": "number of nodes"})
    labels: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "node label the nodes carry (the Workspace's labelSelector.matchLabels); repeatable",
                  "flag": "--label", "metavar": "KEY=VALUE"},
    )
    preferred_nodes: tuple[str, ...] = field(
        default=(), metadata={"help": "an existing node to use before provisioning new ones; repeatable",
                              "flag": "--preferred-node", "metavar": "NAME"}
    )
    timeout: float = field(default=1800.0, metadata={"help": "seconds to wait for the nodes to become Ready"})
    poll_interval: float = field(default=5.0, metadata={"help": "seconds between status checks"})
    kubeconfig: str | None = field(
        default=None,
        metadata={"help": "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the pod's service account)"},
    )
    wait_only: bool = field(
        default=False,
        metadata={"help": "create nothing: wait for the nodes the kaiflow operator requested for the Workspace and "
                          "report them (the controller's Workflows; their pods hold no right to create or delete "
                          "nodes)"},
    )

    def validate(self) -> None:
        if self.provider not in PROVIDERS:
            raise StepError(f"--provider: {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if len(self.workspace_name) > 63 or not _DNS_1035.match(self.workspace_name):
            # It is the value of the nodes' kaito.sh/workspace label and the name of the Service
            # deploy makes: refused here, before any node exists, not after.
            raise StepError(f"--workspace-name: {self.workspace_name!r} is not a valid Workspace name (a DNS-1035 "
                            "label: lowercase letters, digits and '-', a letter first, at most 63; it names the "
                            "Service and labels the nodes)")
        if len(self.namespace) > 63 or not _DNS_LABEL.match(self.namespace):
            raise StepError(f"--namespace: {self.namespace!r} is not a valid namespace name")
        if not 1 <= self.count <= MAX_COUNT:
            raise StepError(f"--count: {self.count} is out of range (1..{MAX_COUNT})")
        for key, value in self.labels.items():
            validate_label(key, value)
            if reserved_node_label(key, provisioning=self.provider in CREATING_PROVIDERS):
                raise StepError(f"--label {key}={value}: {key} is a label kaiflow sets on the nodes it provisions "
                                "(release finds them by it); use another key")
        for node in self.preferred_nodes:
            if len(node) > 253 or not _DNS_SUBDOMAIN.match(node):
                raise StepError(f"--preferred-node: {node!r} is not a valid node name")
        if self.timeout <= 0:
            raise StepError(f"--timeout: must be positive, got {self.timeout}")
        if self.poll_interval <= 0:
            raise StepError(f"--poll-interval: must be positive, got {self.poll_interval}")

    @property
    def label_selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))

    @property
    def owner(self) -> str:
        return owner_annotation(self.namespace, self.workspace_name)


@dataclass(frozen=True)
class ProvisionResult:
    """What the step reports: the node names (output ``nodes``) and provider-specific facts."""

    provider: str
    nodes: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


class Provider(ABC):
    """One way of getting nodes. Subclasses live one per module (local, existing, aks, karpenter)."""

    name: ClassVar[str]
    options_class: ClassVar[type | None] = None  # a dataclass of provider-specific options

    def __init__(self, config: ProvisionConfig, options: Any = None) -> None:
        self.config = config
        self.options = options

    @abstractmethod
    def provision(self) -> ProvisionResult:
        """Make ``config.count`` nodes Ready (creating them if this provider does) and name them.

        With ``config.wait_only`` nothing is created: the operator requested the nodes
        (:meth:`request`), the step only waits for them.
        """

    def request(self) -> list[str]:
        """Create (or re-apply) what :meth:`provision` would, without waiting; the names requested.

        What the kaiflow operator calls before it creates a Workspace's Workflow, so that creating
        and deleting nodes stays with the operator's identity, never a tenant namespace's.
        Providers that create nothing (local, existing) request nothing.
        """
        return []

    def release(self) -> list[str]:
        """Delete what :meth:`provision` made for the Workspace; the names released ([] if nothing).

        Waits until it is gone, at most ``config.timeout`` s. Providers that create nothing
        (local, existing) release nothing: the nodes were there before and stay.
        """
        return []


# -- names and labels ---------------------------------------------------------------------------


# AKS Linux agent pool names: at most 12 characters, lowercase letters and digits, a letter first.
# The gpu-provisioner names a pool after each Karpenter NodeClaim, so claims keep to it too.
POOL_NAME_LIMIT = 12
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def pool_safe_name(workspace: str, namespace: str, index: int | None = None) -> str:
    """A stable name that is a valid AKS agent pool name (≤ 12 lowercase alphanumerics).

    Every character is hash (sha256 of ``namespace/name``): a letter, then base-36 digits, as many
    as the 12-character limit leaves — 12 for an agent pool (≈ 61.6 bits), 10 plus the node index
    (0..99) for a NodeClaim (≈ 51 bits). A clash is then only ever crafted, never an accident, and
    the providers refuse to adopt what another Workspace owns anyway (its owner mark). Karpenter's
    NodeClaims and AKS pools share the scheme, so both providers name a Workspace's nodes alike;
    the Workspace is on their labels and owner mark, not in the name.
    """
    width = POOL_NAME_LIMIT if index is None else POOL_NAME_LIMIT - len(str(MAX_COUNT - 1))
    number = int.from_bytes(hashlib.sha256(f"{namespace}/{workspace}".encode()).digest(), "big")
    number, first = divmod(number, 26)
    chars = [_ALPHABET[first]]
    for _ in range(width - 1):
        number, digit = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(chars) + ("" if index is None else str(index))


def validate_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise StepError(f"--label {key}={value}: the key prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise StepError(f"--label {key}={value}: {name!r} is not a valid label name")
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise StepError(f"--label {key}={value}: {value!r} is not a valid label value")


# -- Kubernetes ---------------------------------------------------------------------------------


def node_is_ready(node: Any) -> bool:
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def node_matches(node: Any, labels: dict[str, str]) -> bool:
    node_labels = node.metadata.labels or {}
    return all(node_labels.get(k) == v for k, v in labels.items())


def ready_preferred_nodes(core: Any, config: ProvisionConfig) -> list[str]:
    """Preferred nodes that exist, are Ready and carry the requested labels (Kaito reuses them)."""
    from kubernetes.client import ApiException

    usable = []
    for name in config.preferred_nodes:
        try:
            node = core.read_node(name)
        except ApiException as exc:
            if exc.status == 404:
                log.warning("preferred node %s does not exist; ignoring it", name)
                continue
            raise api_error(exc, f"reading preferred node {name}") from None
        if not node_is_ready(node):
            log.warning("preferred node %s is not Ready; ignoring it", name)
        elif not node_matches(node, config.labels):
            log.warning("preferred node %s lacks the labels %s; ignoring it", name, config.label_selector)
        else:
            usable.append(name)
    return usable[: config.count]


def wait_until(check: Callable[[], Any], *, timeout: float, interval: float, what: str,
               describe: Callable[[], str] = lambda: "") -> Any:
    """Call ``check`` until it returns something truthy; RetryableError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            state = describe()
            raise RetryableError(f"timed out after {timeout:g} s waiting for {what}" + (f": {state}" if state else ""))
        time.sleep(min(interval, remaining))
