"""The controller's settings: one dataclass, one command-line option per field (``kaiflow controller``).

Every field can also come from the environment (``KAIFLOW_CONTROLLER_<FIELD>``), which is how the
Deployment in ``controller/manifests/`` sets them.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from api.labels import ANNOTATION_OPT_IN, CONTROLLER_COMPONENT
from stepkit.common import add_dataclass_arguments, dataclass_from_args

# Workspaces carrying this annotation with the value "true" are kaiflow's when --opt-in is set.
ENV_PREFIX = "KAIFLOW_CONTROLLER_"


@dataclass(frozen=True)
class ControllerOptions:
    kubeconfig: str | None = field(default=None, metadata={
        "help": "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the pod's service account)"})
    namespace: tuple[str, ...] = field(default=(), metadata={
        "help": "watch only this namespace (repeatable; default: every namespace)"})
    opt_in: bool = field(default=False, metadata={
        "help": f"act only on Workspaces annotated {ANNOTATION_OPT_IN}=true (for clusters that keep Kaito's controller)"})
    target: str = field(default="cluster", metadata={
        "help": "render Workflows for Argo in the cluster (default) or for the local runner (tests, one machine)",
        "choices": ("cluster", "local")})
    local_root: str | None = field(default=None, metadata={
        "help": "--target local: folder holding each Workflow's workdir (<root>/<namespace>/<workflow>)"})
    local_base_dir: str | None = field(default=None, metadata={
        "help": "--target local: folder relative file: URLs and tuning.config resolve against"})
    provider: str | None = field(default=None, metadata={
        "help": "provision provider of the rendered Workflows (default: $KAIFLOW_PROVISIONER or aks)"})
    insecure_registry: tuple[str, ...] = field(default=(), metadata={
        "help": "registry host reached over plain http (repeatable)"})
    workflow_ttl_s: int | None = field(default=None, metadata={
        "help": "seconds a finished Workflow is kept (default: the pipeline's 7 days)"})
    pod_gc: str | None = field(default=None, metadata={
        "help": "Argo podGC strategy of the Workflows (default: OnPodSuccess)",
        "choices": ("OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess")})
    release_after_failure: bool = field(default=True, metadata={
        "help": "free the provisioned nodes as soon as a Workflow fails (Kaito #1107)"})
    max_attempts: int = field(default=3, metadata={
        "help": "automatic runs of one generation's Workflow when it fails, the first included (1 = no retry; "
                "a failure with exit code 2 is never retried)"})
    retry_backoff_s: float = field(default=300.0, metadata={
        "help": "seconds after a failed run before the first retry; doubles with each attempt"})
    retry_backoff_max_s: float = field(default=3600.0, metadata={
        "help": "the longest back-off between automatic retries"})
    max_nodes_per_workspace: int = field(default=4, metadata={
        "help": "most GPU nodes one Workspace may have provisioned (its resource.count or the node estimate); "
                "more is refused with a condition naming resource.count"})
    allow_http_datasets: bool = field(default=False, metadata={
        "help": "allow plain http dataset URLs (default: https only; every address is still checked to be public)"})
    dataset_block_cidr: tuple[str, ...] = field(default=(), metadata={
        "help": "an address range dataset downloads may never reach, besides the non-public ones: the cluster's "
                "service or pod CIDR if it is made of public addresses (repeatable)", "metavar": "CIDR"})
    dataset_allow_cidr: tuple[str, ...] = field(default=(), metadata={
        "help": "an address range dataset downloads may reach although it is not public, e.g. an in-house mirror "
                "(repeatable; the URL must name it by a DNS name: Workspace validation refuses private literal "
                "addresses)", "metavar": "CIDR"})
    allow_remote_code: tuple[str, ...] = field(default=(), metadata={
        "help": "allow ModelConfig.trust_remote_code in tuning ConfigMaps for NAMESPACE, NAMESPACE/PRESET or */PRESET "
                "(repeatable; default: refused everywhere)", "metavar": "NS[/PRESET]"})
    leader_elect: bool = field(default=False, metadata={
        "help": "one of several replicas: act only while holding the Lease --lease-name (the others wait)"})
    lease_name: str = field(default=CONTROLLER_COMPONENT, metadata={"help": "the leader election Lease"})
    lease_namespace: str | None = field(default=None, metadata={
        "help": "namespace of the Lease (default: $POD_NAMESPACE, else kaiflow-system)"})
    lease_duration_s: float = field(default=15.0, metadata={
        "help": "seconds without renewal after which another replica takes the Lease over"})
    delete_deadline_s: float = field(default=120.0, metadata={
        "help": "seconds a deletion waits for node release before letting the Workspace go (Kaito #932)"})
    resync_s: float = field(default=30.0, metadata={
        "help": "seconds between full status refreshes of each Workspace (events refresh at once)"})
    workers: int = field(default=16, metadata={"help": "threads running handlers"})
    liveness_port: int | None = field(default=None, metadata={
        "help": "serve kopf's liveness probe on http://0.0.0.0:PORT/healthz"})
    verbose: bool = field(default=False, metadata={"help": "log every handler call"})

    @property
    def watches_all_namespaces(self) -> bool:
        return not self.namespace


def parse(argv: Sequence[str] | None = None) -> ControllerOptions:
    parser = argparse.ArgumentParser(prog="kaiflow controller",
                                     description="Run the kaiflow operator: Workspaces become Argo Workflows.")
    # Switches and repeatable options come from the command line only (an env "false" is truthy).
    env = {f.name: ENV_PREFIX + f.name.upper() for f in fields(ControllerOptions)
           if f.name not in ("namespace", "insecure_registry", "opt_in", "release_after_failure", "verbose", "leader_elect",
                             "allow_http_datasets", "dataset_block_cidr", "dataset_allow_cidr", "allow_remote_code")}
    add_dataclass_arguments(parser, ControllerOptions, env=env)
    options = dataclass_from_args(ControllerOptions, parser.parse_args(argv))
    if options.target == "local" and not options.local_root:
        parser.error("--local-root is required with --target local")
    for flag, ranges in (("--dataset-block-cidr", options.dataset_block_cidr),
                         ("--dataset-allow-cidr", options.dataset_allow_cidr)):
        for cidr in ranges:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                parser.error(f"{flag}: {cidr!r} is not an address range (e.g. 10.20.0.0/16)")
    return options
