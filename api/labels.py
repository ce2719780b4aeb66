"""Every name that crosses packages on a Kubernetes object: labels, annotations, the finalizer,
Secret keys and ServiceAccount names. One definition for every layer (Kaito keeps its own in
``api/v1beta1/labels.go``); ``tests/api/test_names_live_once.py`` fails when one of these values
is written as a literal anywhere else in the code.

The pipelines put them on Workflows and pods, the provision step on NodeClaims and agent pools,
the deploy step on the Deployment and Service, the controller on what it creates. Kaito's own
names are kept so that Kaito users' selectors (``kubectl get nodes -l kaito.sh/workspace=...``)
keep working.
"""

from __future__ import annotations

# Kaito's labels on the nodes and pods of a Workspace (also the adapter image's annotations).
LABEL_WORKSPACE = "kaito.sh/workspace"
LABEL_WORKSPACE_NAMESPACE = "kaito.sh/workspacenamespace"
LABEL_INSTANCE_TYPE = "node.kubernetes.io/instance-type"
ANNOTATION_PRESET = "kaito.sh/preset"
# The labels the node provisioners key on: Karpenter's node pool, the AKS agent pool.
LABEL_KARPENTER_NODEPOOL = "karpenter.sh/nodepool"
LABEL_AKS_AGENTPOOL = "agentpool"
LABEL_AKS_AGENTPOOL_QUALIFIED = "kubernetes.azure.com/agentpool"

# kaiflow's own bookkeeping: every kaiflow label and annotation starts with this prefix.
KAIFLOW_PREFIX = "kaiflow.kaito.sh"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kaiflow"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_PIPELINE = f"{KAIFLOW_PREFIX}/pipeline"
# The Workspace generation a Workflow was made for.
LABEL_GENERATION = f"{KAIFLOW_PREFIX}/generation"
ANNOTATION_OWNER = f"{KAIFLOW_PREFIX}/owner"
# The immutable fields a pipeline was made for (JSON): what a later generation is compared with.
ANNOTATION_IMMUTABLE = f"{KAIFLOW_PREFIX}/immutable"
# Set to a new value (any token, e.g. a timestamp) to run the current generation's pipeline again:
# a generation's Workflow otherwise runs once (status.pipeline.run records it).
ANNOTATION_RERUN = f"{KAIFLOW_PREFIX}/rerun"
# Pods whose egress the install's NetworkPolicy limits to public addresses (the dataset download).
LABEL_EGRESS = f"{KAIFLOW_PREFIX}/egress"
EGRESS_PUBLIC = "public-only"
# With --opt-in the controller acts only on Workspaces annotated "true" (clusters that keep Kaito's).
ANNOTATION_OPT_IN = f"{KAIFLOW_PREFIX}/managed"
# "true": the Workspace's labelSelector names nodes the user brought (api.defaults.uses_own_nodes).
ANNOTATION_OWN_NODES = f"{KAIFLOW_PREFIX}/bring-your-own-nodes"
# The Secret (key API_KEY_SECRET_KEY) whose value the chat service requires as a bearer key;
# referenced by the Deployment and the smoke test, never read by kaiflow.
ANNOTATION_API_KEY_SECRET = f"{KAIFLOW_PREFIX}/api-key-secret"
# The adapter image's annotations about the tuning that made it.
ANNOTATION_METHOD = f"{KAIFLOW_PREFIX}/method"
ANNOTATION_DATASET_DIGEST = f"{KAIFLOW_PREFIX}/dataset-digest"
FINALIZER = f"{KAIFLOW_PREFIX}/finalizer"

# Argo's own names kaiflow reads or sets.
LABEL_CRON_WORKFLOW = "workflows.argoproj.io/cron-workflow"
ANNOTATION_ARGO_TITLE = "workflows.argoproj.io/title"
ANNOTATION_ARGO_DESCRIPTION = "workflows.argoproj.io/description"

# Keys in the Secrets a Workspace names.
API_KEY_SECRET_KEY = "api-key"
MODEL_ACCESS_SECRET_KEY = "HF_TOKEN"
DOCKER_CONFIG_SECRET_KEY = ".dockerconfigjson"
# The operator's Secret <workspace>-dataset-urls: signed dataset URLs (a query string), one per line.
DATASET_URLS_SECRET_KEY = "dataset-urls.txt"

# ServiceAccounts (controller/manifests/ creates them with their RBAC).
WORKFLOW_SERVICE_ACCOUNT = "kaiflow-workflow"  # every Workflow pod, and Argo's executor
PROVISIONER_SERVICE_ACCOUNT = "kaiflow-provisioner"  # provision and release-nodes
DEPLOYER_SERVICE_ACCOUNT = "kaiflow-deployer"  # deploy (cluster)
CONTROLLER_COMPONENT = "kaiflow-controller"  # the operator's name on the Events it posts

# The field manager of every server-side apply kaiflow makes.
FIELD_MANAGER = "kaiflow"

# Kaito's GPU nodes carry this taint; only pods that tolerate it land there.
GPU_TAINT = {"key": "sku", "value": "gpu", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}


def owner_annotation(namespace: str, name: str) -> str:
    """The value of ``ANNOTATION_OWNER`` for a Workspace: ``kaito.sh/Workspace/<ns>/<name>``."""
    return f"kaito.sh/Workspace/{namespace}/{name}"


# Node label keys a Workspace's resource.labelSelector may not set: release and the status find a
# Workspace's NodeClaims and nodes by them, so a selector that sets them would hide the nodes from
# release (or claim another Workspace's). The provisioners' own keys are reserved only when kaiflow
# provisions (bring-your-own nodes may select an existing pool by them); any key under
# KAIFLOW_PREFIX always.
RESERVED_NODE_LABEL_KEYS = (LABEL_WORKSPACE, LABEL_WORKSPACE_NAMESPACE, LABEL_MANAGED_BY)
PROVISIONER_NODE_LABEL_KEYS = (LABEL_KARPENTER_NODEPOOL, LABEL_INSTANCE_TYPE, LABEL_AKS_AGENTPOOL,
                               LABEL_AKS_AGENTPOOL_QUALIFIED)


def reserved_node_label(key: str, *, provisioning: bool = True) -> bool:
    """Whether a labelSelector / ``--label`` key is one kaiflow sets on the nodes it provisions."""
    if key in RESERVED_NODE_LABEL_KEYS or key.startswith(f"{KAIFLOW_PREFIX}/"):
        return True
    return provisioning and key in PROVISIONER_NODE_LABEL_KEYS
