"""Kaito's and kaiflow's names for labels, annotations and taints: one definition for every layer.

The pipelines put them on Workflows and pods, the provision step on NodeClaims and agent pools,
the deploy step on the Deployment and Service, the controller on what it creates. Kaito's own
names are kept so that Kaito users' selectors (``kubectl get nodes -l kaito.sh/workspace=...``)
keep working.
"""

from __future__ import annotations

# Kaito's labels on the nodes and pods of a Workspace.
LABEL_WORKSPACE = "kaito.sh/workspace"
LABEL_WORKSPACE_NAMESPACE = "kaito.sh/workspacenamespace"
LABEL_INSTANCE_TYPE = "node.kubernetes.io/instance-type"

# kaiflow's own bookkeeping.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kaiflow"
LABEL_PIPELINE = "kaiflow.kaito.sh/pipeline"
ANNOTATION_OWNER = "kaiflow.kaito.sh/owner"

# The field manager of every server-side apply kaiflow makes.
FIELD_MANAGER = "kaiflow"

# Kaito's GPU nodes carry this taint; only pods that tolerate it land there.
GPU_TAINT = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}


def owner_annotation(namespace: str, name: str) -> str:
    """The value of ``ANNOTATION_OWNER`` for a Workspace: ``kaito.sh/Workspace/<ns>/<name>``."""
    return f"kaito.sh/Workspace/{namespace}/{name}"
