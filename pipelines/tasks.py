"""One Hera container template per DAG task: the step's command line and what it needs around it.

Each builder returns a ``hera.workflows.Container`` that runs ``python -m steps.<name> ...`` in the
pipeline image with the command line fixed by DEVELOPERS.md ("Step command lines"). A value a
builder receives is either literal (known when the Workspace is rendered) or an Argo expression
such as ``{{inputs.parameters.dataset-digest}}``; the builders do not care which, so the same
builders make the per-Workspace Workflow (``pipelines.dags``) and the reusable
WorkflowTemplates (``pipelines.templates``).

Around the command line a builder adds what Argo needs: output parameters read from the files a
step writes (``valueFrom.path``; ``globalName`` for those the controller reads from the workflow
status), the loss-curve artifacts of ``tune``, a retry strategy with backoff for steps that talk to
the network (never retrying exit code 2, which is bad input), a deadline, and - in cluster mode
only - the data volume, secret volumes and the GPU scheduling fields passed in ``Scheduling``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hera.workflows import Artifact, Container, Env, NoneArchiveStrategy, Parameter, RawArtifact, RetryStrategy
from hera.workflows import models as m

from api.labels import (
    ANNOTATION_ARGO_DESCRIPTION,
    API_KEY_SECRET_KEY,
    DEPLOYER_SERVICE_ACCOUNT,
    EGRESS_PUBLIC,
    GPU_TOLERATION,
    LABEL_EGRESS,
    MODEL_ACCESS_SECRET_KEY,
    PROVISIONER_SERVICE_ACCOUNT,
    WORKFLOW_SERVICE_ACCOUNT,
)
from pipelines.names import (
    OUTPUT_DATASET_DIGEST,
    OUTPUT_IMAGE,
    OUTPUT_NODES,
    OUTPUT_PROMOTE,
    OUTPUT_PROVIDER,
    OUTPUT_SERVICE_URL,
    TASK_DEPLOY,
    TASK_EVAL_GATE,
    TASK_FETCH_DATASET,
    TASK_PROVISION,
    TASK_PULL_ADAPTERS,
    TASK_PUSH_ADAPTER,
    TASK_RELEASE_NODES,
    TASK_SMOKE_TEST,
    TASK_TUNE,
    dns1123_label,
)
from pipelines.target import ClusterTarget, LocalTarget, Target
from stepkit.common import REMOTE_CODE_ENV, STEP_LOG_ENV

DATA_VOLUME = "kaiflow-data"
TRAINING_CONFIG_VOLUME = "training-config"
DATASET_URLS_VOLUME = "dataset-urls"
OUTPUTS_VOLUME = "kaiflow-outputs"
# Output parameters are short strings and small JSON documents.
OUTPUTS_SIZE_LIMIT = "16Mi"

# Deadlines per step (seconds). Tuning gets its own from the Workspace size (see workspace.py).
DEADLINES = {
    "provision": 3600,  # new GPU nodes on AKS take 5-15 min; quota waits longer
    "fetch_dataset": 3600,
    "eval_gate": 1800,
    "push_adapter": 1800,
    "pull_adapters": 1800,
    "deploy": 3600,  # includes pulling the serving image and loading weights
    "smoke_test": 600,
}

# The global output names the controller reads from the Workflow status.
GLOBAL_OUTPUTS = {
    "dataset-digest": "dataset-digest",
    "eval-loss": "eval-loss",
    "promote": "promote",
    "adapter-digest": "adapter-digest",
    "image": "adapter-image",
    "service-url": "service-url",
}


INPUT_REFERENCE = re.compile(r"\{\{inputs\.parameters\.([A-Za-z0-9_-]+)\}\}")


def input_ref(name: str) -> str:
    return f"{{{{inputs.parameters.{name}}}}}"


def workflow_ref(name: str) -> str:
    """A Workflow argument (``spec.arguments``), which a user changes on resubmit (``-p name=value``)."""
    return f"{{{{workflow.parameters.{name}}}}}"


def network_retry() -> RetryStrategy:
    """Retry transient failures with backoff; exit code 2 is bad input and never retried."""
    return RetryStrategy(
        limit=3,
        retry_policy="Always",
        expression="asInt(lastRetry.exitCode) != 2",
        backoff=m.Backoff(duration="30s", factor=2, max_duration="20m"),
    )


@dataclass(frozen=True)
class Scheduling:
    """Kubernetes scheduling of a step that needs the GPU nodes (cluster mode only)."""

    gpus: int = field(default=0, metadata={"help": "nvidia.com/gpu requested and limited"})
    memory_gib: int | None = field(default=None, metadata={"help": "memory request of the container"})
    cpu: int | None = field(default=None, metadata={"help": "CPU request of the container"})
    node_selector: dict[str, str] | None = field(default=None, metadata={"help": "from resource.labelSelector.matchLabels"})
    match_expressions: tuple[m.NodeSelectorRequirement, ...] = field(
        default=(), metadata={"help": "from resource.labelSelector.matchExpressions, as required node affinity"}
    )
    on_gpu_node: bool = field(default=False, metadata={
        "help": "placed on the GPU nodes (their taints tolerated) without requesting a GPU"})

    def placement_only(self) -> Scheduling:
        """The same nodes, no GPU, memory or CPU request: for the data volume's first consumer, so a
        WaitForFirstConsumer volume (AKS's default classes) is made in the GPU node's zone."""
        return Scheduling(node_selector=self.node_selector, match_expressions=self.match_expressions, on_gpu_node=True)

    def resources(self) -> m.ResourceRequirements | None:
        requests: dict[str, m.Quantity] = {}
        limits: dict[str, m.Quantity] = {}
        if self.memory_gib:
            requests["memory"] = m.Quantity(f"{self.memory_gib}Gi")
        if self.cpu:
            requests["cpu"] = m.Quantity(str(self.cpu))
        if self.gpus:
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = m.Quantity(str(self.gpus))
        if not requests:
            return None
        return m.ResourceRequirements(requests=requests, limits=limits or None)

    def tolerations(self) -> list[m.Toleration] | None:
        if not self.gpus and not self.on_gpu_node:
            return None
        # GPU node pools are tainted so only GPU work lands there: the NVIDIA device plugin's
        # taint and the one Kaito's gpu-provisioner puts on the nodes it creates.
        return [
            m.Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
            m.Toleration(**GPU_TOLERATION),
        ]

    def affinity(self) -> m.Affinity | None:
        if not self.match_expressions:
            return None
        return m.Affinity(
            node_affinity=m.NodeAffinity(
                required_during_scheduling_ignored_during_execution=m.NodeSelector(
                    node_selector_terms=[m.NodeSelectorTerm(match_expressions=list(self.match_expressions))]
                )
            )
        )


def _step(
    target: Target,
    *,
    name: str,
    module: str,
    args: Sequence[str],
    inputs: Iterable[str] = (),
    outputs: Iterable[str] = (),
    artifacts: Sequence[Artifact] = (),
    input_artifacts: Sequence[Artifact] = (),
    retry: bool = False,
    deadline: int | None = None,
    data_volume: bool = True,
    mounts: Sequence[m.VolumeMount] = (),
    env: Sequence[Env | m.EnvVar] = (),
    scheduling: Scheduling | None = None,
    service_account: str | None = None,
    labels: dict[str, str] | None = None,
    description: str = "",
    kubernetes_api: bool = False,
    metrics: Sequence[m.Prometheus] = (),
    output_defaults: dict[str, str] | None = None,
) -> Container:
    """``kubernetes_api``: the step talks to the API server, so its pod gets a service-account token.
    ``artifacts``: output artifacts; ``input_artifacts``: files Argo's executor places before the step starts."""
    cluster = target.is_cluster
    # Every {{inputs.parameters.X}} the command line uses is declared, explicit ones first.
    declared = list(dict.fromkeys([*inputs, *(r for a in args for r in INPUT_REFERENCE.findall(a))]))
    volume_mounts = list(mounts) if cluster else []
    if cluster and data_volume:
        volume_mounts.insert(0, m.VolumeMount(name=DATA_VOLUME, mount_path=target.data_root))
    scheduling = scheduling if cluster else None
    annotations = {ANNOTATION_ARGO_DESCRIPTION: description} if description else None
    volumes: list[m.Volume] = []
    if cluster and outputs:
        # The output files live in a small emptyDir rather than the container's writable layer.
        volumes.append(m.Volume(name=OUTPUTS_VOLUME, empty_dir=m.EmptyDirVolumeSource(
            size_limit=m.Quantity(OUTPUTS_SIZE_LIMIT))))
        volume_mounts.append(m.VolumeMount(name=OUTPUTS_VOLUME, mount_path=target.outputs_dir))
    pod_security = container_security = executor = automount = None
    if cluster:
        pod_security, container_security = _security_contexts(target)
        if not kubernetes_api:
            # No token in pods that never call the API; Argo's executor sidecar still needs one,
            # from its own service account (Argo requires executor.serviceAccountName then).
            automount = False
            # Argo's executor sidecar reports outputs through the API, so it needs a token even
            # where the step's own container gets none (the same account the Workflow runs as).
            executor = m.ExecutorConfig(service_account_name=WORKFLOW_SERVICE_ACCOUNT)
    return Container(
        name=name,
        image=target.images.pipeline,
        image_pull_policy=target.images.pull_policy,
        command=["python", "-m", f"steps.{module}"],
        args=[*args, "--outputs", target.outputs_dir] if outputs else list(args),
        inputs=[*(Parameter(name=i) for i in declared), *input_artifacts] or None,
        outputs=[
            Parameter(name=o, value_from=m.ValueFrom(path=target.output_path(o), default=(output_defaults or {}).get(o)),
                      global_name=GLOBAL_OUTPUTS.get(o))
            for o in outputs
        ]
        + list(artifacts)
        or None,
        env=list(env) or None,
        volume_mounts=volume_mounts or None,
        retry_strategy=network_retry() if retry else None,
        active_deadline_seconds=deadline,
        resources=scheduling.resources() if scheduling else None,
        node_selector=scheduling.node_selector if scheduling else None,
        tolerations=scheduling.tolerations() if scheduling else None,
        affinity=scheduling.affinity() if scheduling else None,
        service_account_name=service_account if cluster else None,
        labels=labels if cluster else None,
        annotations=annotations,
        volumes=volumes or None,
        pod_security_context=pod_security,
        security_context=container_security,
        automount_service_account_token=automount,
        executor=executor,
        metrics=m.Metrics(prometheus=[*metrics, _duration_metric(name)]) if cluster else None,
    )


def _duration_metric(step: str) -> m.Prometheus:
    return m.Prometheus(
        name="kaiflow_step_duration_seconds", help="Seconds a kaiflow step ran, by step and final status",
        labels=[m.MetricLabel(key="step", value=step), m.MetricLabel(key="status", value="{{status}}")],
        gauge=m.Gauge(value="{{duration}}", realtime=False),
    )


def output_metric(name: str, help: str, output: str, labels: dict[str, str]) -> m.Prometheus:
    """A gauge Argo sets from one of the step's output parameters when the step succeeded."""
    return m.Prometheus(
        name=name, help=help, when="{{status}} == Succeeded",
        labels=[m.MetricLabel(key=k, value=v) for k, v in labels.items()],
        gauge=m.Gauge(value=f"{{{{outputs.parameters.{output}}}}}", realtime=False),
    )


def _security_contexts(target: Target) -> tuple[m.PodSecurityContext, m.SecurityContext]:
    """Run as the image's non-root user; ``fsGroup`` makes fresh (root-owned) volumes writable to it."""
    uid = target.images.pipeline_uid
    pod = m.PodSecurityContext(
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, fs_group=uid,
        # chown a large checkpoint volume only when its root is not ours yet, not on every mount
        fs_group_change_policy="OnRootMismatch",
        seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )
    container = m.SecurityContext(allow_privilege_escalation=False, capabilities=m.Capabilities(drop=["ALL"]))
    return pod, container


def _secret_env(variable: str, secret: str, key: str) -> m.EnvVar:
    """An environment variable read from a Secret by reference: the value never enters the manifest."""
    return m.EnvVar(name=variable, value_from=m.EnvVarSource(secret_key_ref=m.SecretKeySelector(name=secret, key=key)))


def _flag(flag: str, values: Iterable[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _registry_flags(target: Target, image: str, docker_config: str | None) -> list[str]:
    """``image`` is the literal reference (a placeholder's default): its registry decides ``--insecure``."""
    flags = ["--docker-config", docker_config] if docker_config else []
    return flags + (["--insecure"] if target.is_insecure(image) else [])


def docker_config_mount(target: Target, secret_name: str | None) -> list[m.VolumeMount]:
    """The mount of a docker-config Secret volume (the volume itself is declared on the workflow)."""
    if not target.is_cluster or secret_name is None:
        return []
    path = target.docker_config(secret_name).rsplit("/", 1)[0]
    return [m.VolumeMount(name=docker_config_volume_name(secret_name), mount_path=path, read_only=True)]


def docker_config_volume_name(secret_name: str) -> str:
    """A valid volume name for any Secret name (``acr.push`` -> ``docker-config-acr-push-<hash>``)."""
    return dns1123_label(f"docker-config-{secret_name}")


def carries_training_config(target: Target) -> bool:
    """The training config travels inside the Workflow (``kaiflow render`` had the ConfigMap) rather than
    in a mounted ConfigMap volume."""
    return isinstance(target, ClusterTarget) and target.training_config_text is not None


def _training_config(target: Target, config: str | None, config_map: str | None) -> tuple[list[m.VolumeMount], list[Artifact]]:
    """How a cluster step gets ``tuning.config``'s training_config.yaml at ``config``: the ConfigMap volume's
    mount, or (``carries_training_config``) a raw input artifact at the same path, so the Workflow alone
    carries what the step reads (``argo submit`` drops every other document of a stream)."""
    if not (target.is_cluster and config and config_map):
        return [], []
    if carries_training_config(target):
        # Argo's init container writes the text into its input-artifacts emptyDir and mounts that
        # file (subPath) at the path; 0444: readable by the step's non-root user
        return [], [RawArtifact(name=TRAINING_CONFIG_VOLUME, path=config, data=target.training_config_text, mode=0o444)]
    return [m.VolumeMount(name=TRAINING_CONFIG_VOLUME, mount_path=config.rsplit("/", 1)[0], read_only=True)], []


# -- the steps ----------------------------------------------------------------------------------


def _azure_identity(target: Target) -> tuple[list[Env | m.EnvVar], dict[str, str] | None]:
    """Environment and pod labels of a step that calls Azure (provider aks)."""
    # A parameterised provider (reusable WorkflowTemplate) may be aks: wire the identity optionally.
    parameterised = "{{" in target.provider
    if target.provider != "aks" and not parameterised:
        return [], None
    # Azure access by workload identity: the pod's service account is federated with a
    # managed identity; which cluster to grow comes from a ConfigMap the install creates.
    env: list[Env | m.EnvVar] = [
        m.EnvVar(name=var, value_from=m.EnvVarSource(config_map_key_ref=m.ConfigMapKeySelector(
            name="kaiflow-azure", key=key, optional=True if parameterised else None)))
        for var, key in (
            ("AZURE_SUBSCRIPTION_ID", "subscriptionId"),
            ("AZURE_RESOURCE_GROUP", "resourceGroup"),
            ("AZURE_CLUSTER_NAME", "clusterName"),
        )
    ]
    return env, {"azure.workload.identity/use": "true"}


def provision(target: Target, *, workspace_name: str, namespace: str, instance_type: str | None, count: str,
              labels: Sequence[str], preferred_nodes: Sequence[str] = (), name: str = TASK_PROVISION,
              wait_only: bool = False) -> Container:
    """``wait_only``: the kaiflow operator creates the nodes (``steps.provision.release.request``)
    and the task only waits for them, with no Azure identity and no right to create or delete."""
    args = ["--provider", target.provider, "--workspace-name", workspace_name, "--namespace", namespace]
    if instance_type:
        args += ["--instance-type", instance_type]
    args += ["--count", count, *_flag("--label", labels)]
    args += _flag("--preferred-node", preferred_nodes)
    if wait_only:
        args.append("--wait-only")
    env, pod_labels = ([], None) if wait_only else _azure_identity(target)
    return _step(
        target, name=name, module="provision", args=args, outputs=[OUTPUT_NODES, OUTPUT_PROVIDER], retry=True,
        deadline=DEADLINES["provision"], data_volume=False, env=env, service_account=PROVISIONER_SERVICE_ACCOUNT,
        kubernetes_api=True,
        labels=pod_labels, description="Provision the GPU nodes the Workspace runs on",
    )


def release_nodes(target: Target, *, workspace_name: str, namespace: str, name: str = TASK_RELEASE_NODES) -> Container:
    """The exit handler's step: delete the nodes ``provision`` made for this Workspace.

    One function so that the delete command line (``steps.provision --delete``) changes in one place.
    """
    args = ["--delete", "--provider", target.provider, "--workspace-name", workspace_name, "--namespace", namespace]
    env, pod_labels = _azure_identity(target)
    return _step(
        target, name=name, module="provision", args=args, retry=True, deadline=DEADLINES["provision"],
        data_volume=False, service_account=PROVISIONER_SERVICE_ACCOUNT, kubernetes_api=True, env=env, labels=pod_labels,
        description="Release the nodes provision-nodes made (exit handler of a hand-submitted Workflow)",
    )


def fetch_dataset(target: Target, *, urls: Sequence[str], max_bytes: str | None = None,
                  eval_fraction: str | None = None, config: str | None = None, config_map: str | None = None,
                  scheduling: Scheduling | None = None, url_file: str | None = None,
                  name: str = TASK_FETCH_DATASET) -> Container:
    """``config``: Kaito's training_config.yaml, whose DatasetConfig (columns, split) the step applies.
    ``scheduling``: where it runs; the first user of the data volume, so on the GPU node (zones)."""
    args = [*_flag("--url", [target.dataset_url(u) for u in urls]), "--output-dir", target.data("dataset")]
    if url_file:  # the URLs are in a mounted Secret (signed URLs: never in the spec or the arguments)
        args += ["--url-file", url_file]
    if max_bytes:
        args += ["--max-bytes", max_bytes]
    if eval_fraction:
        args += ["--eval-fraction", eval_fraction]
    if config:
        args += ["--config", config]
    mounts, config_artifacts = _training_config(target, config, config_map)
    if url_file and target.is_cluster:
        mounts.append(m.VolumeMount(name=DATASET_URLS_VOLUME, mount_path=url_file.rsplit("/", 1)[0], read_only=True))
    labels = None
    if isinstance(target, ClusterTarget):
        # In a cluster the URL is the user's and the pod sits inside the cluster network: public
        # addresses only, checked at every connection (steps/fetch_dataset/egress.py), and the
        # install's NetworkPolicy (kaiflow-dataset-egress) selects the pod by this label.
        args += ["--public-only", *(["--allow-http"] if target.allow_http_datasets else []),
                 *_flag("--block-cidr", list(target.dataset_block_cidrs)),
                 *_flag("--allow-cidr", list(target.dataset_allow_cidrs))]
        labels = {LABEL_EGRESS: EGRESS_PUBLIC}
    return _step(
        target, name=name, module="fetch_dataset", args=args, outputs=[OUTPUT_DATASET_DIGEST, "summary"], retry=True,
        deadline=DEADLINES["fetch_dataset"], mounts=mounts, input_artifacts=config_artifacts, labels=labels,
        scheduling=scheduling,
        description="Download and check the training data (parquet/jsonl/json/csv/arrow)",
    )


def tune_log_path(target: Target) -> str:
    """Where the tune step's log is kept (``KAIFLOW_STEP_LOG``): on the data volume, beside the adapters."""
    return target.data("logs", "tune.log")


def tune(target: Target, *, preset: str, method: str, adapter_name: str, config: str | None,
         config_map: str | None, scheduling: Scheduling | None, deadline: int, max_steps: str | None = None,
         model_access_secret: str | None = None, epochs: str | None = None, name: str = TASK_TUNE) -> Container:
    adapter_dir = target.data("adapters", adapter_name)
    args = [
        "--preset", preset, "--method", method, "--dataset-dir", target.data("dataset"),
        "--output-dir", adapter_dir, "--checkpoint-dir", target.data("checkpoints"),
        "--dataset-digest", input_ref("dataset-digest"),
    ]
    if config:
        args += ["--config", config]
    if max_steps:
        args += ["--max-steps", max_steps]
    if epochs:
        args += ["--epochs", epochs]
    if target.is_cluster and scheduling and scheduling.gpus:
        # one data-parallel process per GPU the pod requests: the same value as its nvidia.com/gpu
        args += ["--nproc", str(scheduling.gpus)]
    mounts, config_artifacts = _training_config(target, config, config_map)
    # the step's log, kept on the data volume (appended across retries): an artifact here, and
    # push-adapter puts it inside the adapter image beside loss.png
    env = [Env(name=STEP_LOG_ENV, value=tune_log_path(target))]
    if target.is_cluster:
        # Weights are downloaded once per workflow onto the data volume; a retried tune pod
        # finds them there and resumes from the last checkpoint on the same volume.
        env.append(Env(name="HF_HOME", value=target.data("hf-cache")))
        if isinstance(target, ClusterTarget) and not target.allow_remote_code:
            # trust_remote_code in the tenant's ConfigMap would run a repository's code next to the
            # HF token and the data volume: refused unless the admin allowed it (the install's setting).
            env.append(Env(name=REMOTE_CODE_ENV, value="refuse"))
        if model_access_secret:
            # the Hub reads the token from the variable of the key's name
            env.append(_secret_env(MODEL_ACCESS_SECRET_KEY, model_access_secret, MODEL_ACCESS_SECRET_KEY))
    loss_curve = [
        Artifact(name="loss-curve", path=f"{adapter_dir}/loss.png", archive=NoneArchiveStrategy(), optional=True),
        Artifact(name="loss-history", path=f"{adapter_dir}/loss.json", archive=NoneArchiveStrategy(), optional=True),
        Artifact(name="training-log", path=tune_log_path(target), archive=NoneArchiveStrategy(), optional=True),
        # TensorBoard's event files, when the training config's report_to asks for them (a folder: tar.gz)
        Artifact(name="tensorboard", path=f"{adapter_dir}/tensorboard", optional=True),
    ]
    labels = {"adapter": adapter_name, "preset": preset, "method": method}
    metrics = [
        output_metric("kaiflow_tune_eval_loss", "Held-out loss of the tuned adapter", "eval-loss", labels),
        output_metric("kaiflow_tune_train_loss", "Last training loss of the tuned adapter", "train-loss", labels),
        output_metric("kaiflow_tune_tokens_per_second", "Training throughput (real tokens per second)",
                      "tokens-per-second", labels),
    ]
    return _step(
        target, name=name, module="tune", args=args, outputs=["train-loss", "eval-loss", "tokens-per-second"],
        metrics=metrics,
        artifacts=loss_curve, input_artifacts=config_artifacts, deadline=deadline, mounts=mounts, env=env,
        scheduling=scheduling,
        # no .upper(): in a WorkflowTemplate `method` is an Argo placeholder, which is case-sensitive
        description=f"Fine-tuning of {preset} ({method})",
    )


def eval_gate(target: Target, *, adapter_name: str, current_image: str, docker_config: str | None,
              mounts: Sequence[m.VolumeMount] = (), registry_image: str | None = None, same_rows: bool = False,
              scheduling: Scheduling | None = None, name: str = TASK_EVAL_GATE) -> Container:
    """``registry_image``: the literal reference whose registry decides ``--insecure`` when
    ``current_image`` is a placeholder. ``same_rows``: score both adapters on the candidate's
    held-out rows (the base model loads here too, on the tune's GPU scheduling)."""
    args = ["--candidate-dir", target.data("adapters", adapter_name), "--current-image", current_image]
    env = []
    if same_rows:
        args += ["--dataset-dir", target.data("dataset")]
        if target.is_cluster:
            env.append(Env(name="HF_HOME", value=target.data("hf-cache")))
    args += _registry_flags(target, registry_image or current_image, docker_config)
    return _step(
        target, name=name, module="eval_gate", args=args,
        outputs=[OUTPUT_PROMOTE, "current-eval-loss", "candidate-eval-loss", "gate-basis"], retry=True,
        deadline=DEADLINES["eval_gate"], mounts=mounts, env=env, scheduling=scheduling if same_rows else None,
        description="Promote the new adapter only if its held-out loss is no worse than the serving one",
    )


def push_adapter(target: Target, *, adapter_name: str, image: str, docker_config: str | None,
                 tag: str | None = None, also_tag: str | None = None, annotations: dict[str, str] | None = None,
                 mounts: Sequence[m.VolumeMount] = (), registry_image: str | None = None,
                 name: str = TASK_PUSH_ADAPTER) -> Container:
    """``registry_image`` as for ``eval_gate``."""
    args = ["--adapter-dir", target.data("adapters", adapter_name), "--image", image]
    if tag:
        args += ["--tag", tag]
    if also_tag:
        args += ["--also-tag", also_tag]
    args += _registry_flags(target, registry_image or image, docker_config)
    args += _flag("--annotation", [f"{k}={v}" for k, v in (annotations or {}).items()])
    args += ["--attach", tune_log_path(target)]  # the training log travels inside the adapter image
    return _step(
        target, name=name, module="push_adapter", args=args,
        outputs=["adapter-digest", OUTPUT_IMAGE], retry=True, deadline=DEADLINES["push_adapter"], mounts=mounts,
        description=f"Push the adapter to {image} with ORAS",
    )


def pull_adapters(target: Target, *, adapters: Sequence[str], docker_config: str | None,
                  mounts: Sequence[m.VolumeMount] = (), name: str = TASK_PULL_ADAPTERS) -> Container:
    """``adapters`` are ``NAME=IMAGE`` specs, as the step takes them."""
    args = [*_flag("--adapter", adapters), "--dest", target.data("adapters")]
    if docker_config:
        args += ["--docker-config", docker_config]
    if any(target.is_insecure(spec.split("=", 1)[-1]) for spec in adapters):
        args.append("--insecure")
    return _step(
        target, name=name, module="pull_adapters", args=args, outputs=["adapters"], retry=True,
        deadline=DEADLINES["pull_adapters"], mounts=mounts, description="Pull the Workspace's adapters with ORAS",
    )


def deploy(target: Target, *, workspace_name: str, namespace: str, preset: str,
           adapters: Sequence[tuple[str, str]], adapter_images: Sequence[str] = (), gpus: int | None = None,
           node_labels: Sequence[str] = (), docker_config_secret: str | None = None,
           workspace_uid: str | None = None, inputs: Iterable[str] = (), name: str = TASK_DEPLOY,
           service_env: dict[str, str] | None = None, model_access_secret: str | None = None,
           api_key_secret: str | None = None, registry_image: str | None = None) -> Container:
    """``adapters`` are (NAME, STRENGTH); ``adapter_images`` NAME=IMAGE for the cluster's init container;
    ``registry_image``: the literal reference whose registry decides ``--insecure`` when the images
    are placeholders (the tuning DAG's adapter is only known once push-adapter has run).

    Locally the service reads the adapters the earlier tasks left under the data folder; in a
    cluster the serving pods cannot see the workflow's volume (it is gone when the workflow ends),
    so they pull the same images themselves.
    """
    args = ["--mode", target.deploy_mode, "--workspace-name", workspace_name, "--namespace", namespace, "--preset", preset]
    if target.is_cluster:
        args += _flag("--adapter", [f"{n}:{s}" for n, s in adapters])
        args += _flag("--adapter-image", adapter_images)
        args += ["--image", target.images.serving]
        if gpus:
            args += ["--gpus", str(gpus)]
        args += _flag("--node-label", node_labels)
        if docker_config_secret:
            args += ["--docker-config-secret", docker_config_secret]
        if workspace_uid:
            args += ["--workspace-uid", workspace_uid]
        if model_access_secret:
            args += ["--model-access-secret", model_access_secret]
        if api_key_secret:
            args += ["--api-key-secret", api_key_secret]
        args += _flag("--service-env", [f"{k}={v}" for k, v in sorted((service_env or {}).items())])
        literal = [registry_image] if registry_image else [spec.split("=", 1)[-1] for spec in adapter_images]
        if any(target.is_insecure(image) for image in literal):
            args.append("--insecure")
    else:
        assert isinstance(target, LocalTarget)
        if adapters:
            args += ["--adapters-dir", target.data("adapters"), *_flag("--adapter", [f"{n}:{s}" for n, s in adapters])]
        args += ["--workdir", f"{target.workdir}/serve"]
        if target.port:
            args += ["--port", str(target.port)]
    return _step(
        target, name=name, module="deploy", args=args, inputs=inputs, outputs=[OUTPUT_SERVICE_URL],
        data_volume=not target.is_cluster,
        deadline=DEADLINES["deploy"], service_account=DEPLOYER_SERVICE_ACCOUNT, kubernetes_api=True,
        description="Roll out the BentoML chat service",
        # local mode: the service started by the step inherits these (inference.config settings);
        # in a cluster they go to the Deployment through --service-env
        env=[] if target.is_cluster else [Env(name=k, value=v) for k, v in sorted((service_env or {}).items())],
    )


def smoke_test(target: Target, *, api_key_secret: str | None = None, model: str | None = None,
               name: str = TASK_SMOKE_TEST) -> Container:
    """``api_key_secret``: the service requires a bearer key; the step reads it as KAIFLOW_API_KEY.
    ``model``: the served name ``/v1/models`` must list (clients written from the docs send it)."""
    env = []
    if api_key_secret and target.is_cluster:
        env.append(_secret_env("KAIFLOW_API_KEY", api_key_secret, API_KEY_SECRET_KEY))
    args = ["--url", input_ref("service-url")] + (["--model", model] if model else [])
    return _step(
        target, name=name, module="smoke_test", args=args,
        deadline=DEADLINES["smoke_test"], data_volume=False, retry=True, env=env,
        description="Ask the service one question and check the answer",
    )
