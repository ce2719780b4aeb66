"""The ``existing`` provider: use nodes that are already in the cluster, create nothing.

It waits (up to ``--timeout``) until ``--count`` Ready nodes are usable and reports them.
Preferred nodes come first, in the order given; then nodes that carry every ``--label``. With
neither labels nor preferred nodes any Ready node would do, which is almost never what a GPU
Workspace wants, so that is refused.
"""

from __future__ import annotations

import logging

from stepkit.common import StepError, report_progress
from stepkit.kube import api_client, api_error
from steps.provision.base import Provider, ProvisionResult, node_is_ready, node_matches, wait_until

log = logging.getLogger("kaiflow.steps.provision.existing")


class ExistingProvider(Provider):
    name = "existing"

    def provision(self) -> ProvisionResult:
        from kubernetes import client

        config = self.config
        if not config.labels and not config.preferred_nodes:
            raise StepError("provider existing: give --label (the Workspace's labelSelector) or --preferred-node")
        with api_client(config.kubeconfig) as kube:
            core = client.CoreV1Api(kube)
            last: dict[str, list[str]] = {"ready": [], "not_ready": []}

            def usable() -> list[str]:
                try:
                    if config.labels:
                        nodes = core.list_node(label_selector=config.label_selector).items
                    else:
                        nodes = core.list_node().items
                except client.ApiException as exc:
                    raise api_error(exc, "listing nodes") from None
                by_name = {n.metadata.name: n for n in nodes}
                preferred = [by_name[n] for n in config.preferred_nodes if n in by_name]
                others = sorted((n for n in nodes if n.metadata.name not in config.preferred_nodes),
                                key=lambda n: n.metadata.name)
                # Without labels only the preferred nodes are candidates.
                candidates = preferred + (others if config.labels else [])
                candidates = [n for n in candidates if node_matches(n, config.labels)]
                last["ready"] = [n.metadata.name for n in candidates if node_is_ready(n)]
                last["not_ready"] = [n.metadata.name for n in candidates if not node_is_ready(n)]
                report_progress(min(len(last["ready"]), config.count), config.count)
                return last["ready"][: config.count] if len(last["ready"]) >= config.count else []

            def describe() -> str:
                wanted = config.label_selector or ", ".join(config.preferred_nodes)
                return (f"{len(last['ready'])} of {config.count} Ready nodes matching {wanted}"
                        + (f" (not Ready: {', '.join(last['not_ready'])})" if last["not_ready"] else ""))

            nodes = wait_until(usable, timeout=config.timeout, interval=config.poll_interval,
                               what=f"{config.count} existing node(s)", describe=describe)
        log.info("using existing nodes: %s", ", ".join(nodes))
        return ProvisionResult(provider=self.name, nodes=nodes, details={"selector": config.label_selector})
