"""Which nodes a rendered pipeline asks for: the provision-nodes command line of its manifest.

The operator creates a Workspace's nodes itself (``steps.provision.release.request``) before it
creates the Workflow or CronWorkflow, and releases them (finalizer, Kaito #1107): the right to
create or delete NodeClaims, and the Azure identity that may write agent pools, are the
operator's, in its own namespace, and never a tenant namespace's (docs/security.md, "Nodes and
tenancy"). The Workflow's provision-nodes task runs the same command line with ``--wait-only``.
"""

from __future__ import annotations

from typing import Any

PROVISION_MODULE = "steps.provision"
WAIT_ONLY = "--wait-only"


def provision_args(manifest: dict[str, Any]) -> list[str] | None:
    """The provision-nodes task's arguments (``--wait-only`` included), or None when the pipeline
    does not create nodes (local, existing, bring-your-own nodes: no ``--wait-only`` task)."""
    spec = manifest.get("spec") or {}
    spec = spec.get("workflowSpec") or spec  # a CronWorkflow's runs
    for template in spec.get("templates") or []:
        container = template.get("container") or {}
        args = [str(a) for a in container.get("args") or []]
        if container.get("command", [])[-1:] == [PROVISION_MODULE] and WAIT_ONLY in args:
            return args
    return None
