"""A Workspace becomes one Hera Workflow (or CronWorkflow): the only definition of each DAG.

Tuning::

    provision-nodes -> fetch-dataset -> tune -> push-adapter -> deploy-inference -> smoke-test

Scheduled tuning (``tuning.schedule``, a CronWorkflow with ``concurrencyPolicy: Forbid``)::

    provision-nodes -> fetch-dataset -> tune -> eval-gate -+-> push-adapter   -> deploy-inference -> smoke-test
                                                           |   (promote == true: new tag + latest)
                                                           +-> push-candidate    (promote == false: new tag only)

Inference::

    provision-nodes [-> pull-adapters] -> deploy-inference -> smoke-test

Design choices:

* The eval gate exists only for scheduled tuning. A one-off tuning Workspace has nothing serving
  yet that it could be worse than, so it always promotes (pushes to ``tuning.output.image`` as
  written and deploys). A scheduled run pushes every candidate under a new tag (``--tag auto``:
  timestamp + short digest) so nothing is lost, but only a promoted one moves ``latest`` (what the
  gate compares the next run against) and is rolled out. ``when`` decides between the two push
  tasks; ``deploy-inference`` depends on ``push-adapter.Succeeded``, so it is omitted (not failed)
  when the candidate loses, and so is ``smoke-test``.
* Values known from the Workspace are written into the container arguments; values that flow
  between tasks (dataset digest, service URL, the gate's verdict) are Argo parameters
  (``{{tasks.<task>.outputs.parameters.<name>}}``) so the controller and the Argo UI see them.
* Everything that differs between Argo and ``kaiflow run`` comes from ``pipelines.target.Target``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from hera.workflows import DAG, CronWorkflow, Parameter, Workflow
from hera.workflows import models as m

from api import Workspace, defaults
from api.defaults import api_key_secret
from api.image_ref import ImageRef
from api.inference_config import SERVED_NAME_ENV
from api.labels import (
    ANNOTATION_ARGO_DESCRIPTION,
    ANNOTATION_ARGO_TITLE,
    ANNOTATION_DATASET_DIGEST,
    ANNOTATION_METHOD,
    ANNOTATION_OWNER,
    ANNOTATION_PRESET,
    DATASET_URLS_SECRET_KEY,
    DOCKER_CONFIG_SECRET_KEY,
    LABEL_MANAGED_BY,
    LABEL_PIPELINE,
    LABEL_WORKSPACE,
    MANAGED_BY,
    WORKFLOW_SERVICE_ACCOUNT,
    owner_annotation,
)
from pipelines import tasks
from pipelines.names import (
    cron_workflow_name,
    generate_name,
    OUTPUT_DATASET_DIGEST,
    OUTPUT_IMAGE,
    OUTPUT_PROMOTE,
    OUTPUT_SERVICE_URL,
    TASK_DEPLOY,
    TASK_EVAL_GATE,
    TASK_FETCH_DATASET,
    TASK_PROVISION,
    TASK_PULL_ADAPTERS,
    TASK_PUSH_ADAPTER,
    TASK_PUSH_CANDIDATE,
    TASK_RELEASE_NODES,
    TASK_SMOKE_TEST,
    TASK_TUNE,
    task_output_ref,
)
from pipelines.target import CLUSTER_DATASET_URLS_DIR, TRAINING_CONFIG_KEY, ClusterTarget, Target
from presets import Preset, get_preset, served_model_name
from presets.gpus import Sku

# What a hand-submitted Workflow's exit handler does with the nodes provision-nodes made
# (workflow argument release-nodes): on-failure keeps them for the service a run deployed.
RELEASE_MODES = ("on-failure", "always", "never")
RELEASE_WHEN = (
    "{{workflow.parameters.release-nodes}} == always || "
    "({{workflow.parameters.release-nodes}} == on-failure && {{workflow.status}} != Succeeded)"
)
# The tune step's own default (one pass over the data) when no training config sets it.
DEFAULT_EPOCHS = "1"
WORKFLOW_DEADLINE_S = 3 * 24 * 3600
TTL_AFTER_COMPLETION_S = 7 * 24 * 3600
# How long a succeeded pod (and its log) is kept before Argo's pod GC deletes it (Argo >= 3.5).
POD_GC_DELAY = "24h"


class PipelineError(ValueError):
    """The Workspace cannot become a pipeline (names the field)."""


def build(workspace: Workspace, target: Target | None = None, service_env: dict[str, str] | None = None) -> Workflow | CronWorkflow:
    """The Hera object for a Workspace: a CronWorkflow for scheduled tuning, else a Workflow.

    ``service_env``: serving settings from the Workspace's inference ConfigMap
    (``api.inference_config``), given to a local deploy step, whose service inherits them.
    """
    target = target or Target.cluster()
    if workspace.tuning is not None:
        return _tuning(workspace, target)
    if workspace.inference is not None:
        return _inference(workspace, target, service_env)
    raise PipelineError("a Workspace needs tuning or inference")


# -- sizing -------------------------------------------------------------------------------------


def _tuning_scheduling(workspace: Workspace, preset: Preset) -> tuple[tasks.Scheduling, str | None]:
    """GPU count and memory for the tune pod, and the instance type to provision."""
    sku = defaults.node_sku(workspace)
    selector = workspace.resource.label_selector
    expressions = tuple(
        m.NodeSelectorRequirement(key=e.key, operator=e.operator, values=e.values)
        for e in selector.match_expressions or []
    )
    # Leave room for the kubelet, the daemonsets and the Argo executor sidecar on the node.
    memory = max(4, math.floor(sku.memory_gib * 0.8))
    cpu = max(1, sku.vcpus - 2)
    scheduling = tasks.Scheduling(
        gpus=sku.gpus, memory_gib=memory, cpu=cpu,
        node_selector=dict(selector.match_labels) if selector.match_labels else None,
        match_expressions=expressions,
    )
    return scheduling, defaults.instance_type(workspace)


def _tune_deadline(preset: Preset) -> int:
    return defaults.tune_deadline_s(preset)


def _data_volume_gib(preset: Preset) -> int:
    return defaults.data_volume_gib(preset)


# -- shared parts -------------------------------------------------------------------------------


def _metadata(workspace: Workspace, kind: str) -> dict[str, Any]:
    name, namespace = workspace.metadata.name, workspace.namespace
    labels = {LABEL_WORKSPACE: name, LABEL_MANAGED_BY: MANAGED_BY, LABEL_PIPELINE: kind}
    annotations = {
        ANNOTATION_OWNER: owner_annotation(namespace, name),
        ANNOTATION_ARGO_TITLE: f"{name} ({kind})",
        ANNOTATION_ARGO_DESCRIPTION: _description(workspace, kind),
    }
    owner_references = None
    uid = workspace.metadata.uid
    if uid:
        owner_references = [m.OwnerReference(api_version=workspace.api_version, kind="Workspace", name=name, uid=uid,
                                             controller=True, block_owner_deletion=True)]
    return dict(
        generate_name=generate_name(name, kind), namespace=namespace, labels=labels, annotations=annotations,
        owner_references=owner_references,
    )


def _description(workspace: Workspace, kind: str) -> str:
    spec = workspace.tuning or workspace.inference
    preset = spec.preset.name if spec.preset else "?"
    if kind == "inference":
        return f"serve {preset}" + (f" with {len(spec.adapters)} adapter(s)" if spec.adapters else "")
    return f"{spec.method} tuning of {preset}" + (f" on schedule {spec.schedule}" if spec.schedule else "")


def _workflow_spec(workspace: Workspace, target: Target, kind: str, volume_gib: int, secrets: list[str],
                   config_map: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = dict(entrypoint=kind)
    if not target.is_cluster:
        return spec
    volumes: list[Any] = [
        m.Volume(name=tasks.docker_config_volume_name(s), secret=m.SecretVolumeSource(
            secret_name=s, items=[m.KeyToPath(key=DOCKER_CONFIG_SECRET_KEY, path="config.json")]))
        for s in dict.fromkeys(secrets)
    ]
    if config_map and not tasks.carries_training_config(target):  # else a raw input artifact of the steps reading it
        volumes.append(m.Volume(name=tasks.TRAINING_CONFIG_VOLUME, config_map=m.ConfigMapVolumeSource(
            name=config_map, items=[m.KeyToPath(key=TRAINING_CONFIG_KEY, path=TRAINING_CONFIG_KEY)])))
    pod_labels = {LABEL_WORKSPACE: workspace.metadata.name, LABEL_MANAGED_BY: MANAGED_BY, LABEL_PIPELINE: kind}
    spec.update(
        volumes=volumes or None,
        volume_claim_templates=[
            m.PersistentVolumeClaim(
                metadata=m.ObjectMeta(name=tasks.DATA_VOLUME, labels=pod_labels),
                spec=m.PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"],
                    resources=m.VolumeResourceRequirements(requests={"storage": m.Quantity(f"{volume_gib}Gi")}),
                ),
            )
        ],
        pod_metadata=m.Metadata(labels=pod_labels),
        active_deadline_seconds=WORKFLOW_DEADLINE_S,
        ttl_strategy=m.TTLStrategy(seconds_after_completion=TTL_AFTER_COMPLETION_S),
        # Succeeded pods go a day after they end (their logs readable meanwhile, `argo logs`, the
        # UI); failed ones stay until the Workflow's TTL removes it. With an artifact repository the
        # tune log and loss curve outlive both (artifacts; and archiveLogs in Argo's config).
        pod_gc=m.PodGC(strategy="OnPodSuccess", delete_delay_duration=POD_GC_DELAY),
        volume_claim_gc=m.VolumeClaimGC(strategy="OnWorkflowCompletion"),
        service_account_name=WORKFLOW_SERVICE_ACCOUNT,
    )
    return spec


def _provision_template(workspace: Workspace, target: Target, instance_type: str | None):
    resource = workspace.resource
    if target.is_cluster and defaults.uses_own_nodes(workspace):
        target = replace(target, provider="existing")  # bring-your-own nodes: nothing is created
    # The controller's Workflows (rendered with the Workspace's uid): the operator creates the nodes
    # before the Workflow and releases them; the task only waits (docs/security.md, "Nodes and tenancy").
    wait_only = target.is_cluster and bool(workspace.metadata.uid) and target.provider in ("aks", "karpenter")
    return tasks.provision(
        target, workspace_name=workspace.metadata.name, namespace=workspace.namespace,
        instance_type=instance_type, count=str(resource.count), labels=_node_labels(workspace),
        preferred_nodes=resource.preferred_nodes or (), wait_only=wait_only,
    )


def _node_labels(workspace: Workspace) -> list[str]:
    selector = workspace.resource.label_selector
    labels = [f"{k}={v}" for k, v in (selector.match_labels or {}).items()]
    # validation admits only single-value In expressions (Kaito's rule): each is one more label
    return labels + [f"{e.key}={e.values[0]}" for e in selector.match_expressions or [] if e.operator == "In" and e.values]


def _repository(image: str) -> str:
    """``registry/repo:tag`` -> ``registry/repo``, normalised as Docker does (``x:1`` -> ``docker.io/library/x``)."""
    try:
        return ImageRef.parse(image, allow_placeholders=True).repo
    except ValueError as exc:
        raise PipelineError(f"tuning.output.image: {exc}") from None


def _arguments(values: dict[str, tuple[str, str]]) -> list[Parameter]:
    """``spec.arguments``: name -> (value, description)."""
    return [Parameter(name=n, value=v, description=d) for n, (v, d) in values.items()]


def _releases_nodes(workspace: Workspace, target: Target) -> bool:
    """A hand-submitted Workflow (``kaiflow render | argo submit``) releases its nodes on exit.

    The controller's Workflows (rendered with the Workspace's uid) leave them to the controller,
    which owns them with the Workspace; the local provider makes no nodes.
    """
    return target.provider != "local" and not workspace.metadata.uid


def _release_arguments(workspace: Workspace, target: Target) -> dict[str, tuple[str, str]]:
    if not _releases_nodes(workspace, target):
        return {}
    # the argument is named after the task it controls
    return {TASK_RELEASE_NODES: ("on-failure", f"when the exit handler deletes the nodes {TASK_PROVISION} made: "
                                            + ", ".join(RELEASE_MODES))}


def _exit_handler(workspace: Workspace, target: Target) -> str | None:
    """Add the exit handler (inside the workflow's context) and return its name, if it has one."""
    if not _releases_nodes(workspace, target):
        return None
    release_t = tasks.release_nodes(target, workspace_name=workspace.metadata.name,
                                    namespace=workspace.namespace)
    with DAG(name="exit-handler"):
        release_t(name=TASK_RELEASE_NODES, when=RELEASE_WHEN)
    return "exit-handler"


def _dataset_arguments(urls: list[str]) -> dict[str, tuple[str, str]]:
    if len(urls) == 1:
        return {"dataset-url": (urls[0], "URL of the training data (http, https or file)")}
    return {f"dataset-url-{i}": (url, f"URL {i} of the training data") for i, url in enumerate(urls, 1)}


# -- tuning -------------------------------------------------------------------------------------


def _tuning(workspace: Workspace, target: Target) -> Workflow | CronWorkflow:
    tuning = workspace.tuning
    preset = get_preset(tuning.preset.name)
    name = workspace.metadata.name
    namespace = workspace.namespace
    output = tuning.output
    if output.image is None:
        raise PipelineError("tuning.output.volumeSource is not supported by the pipeline yet: set tuning.output.image")
    if tuning.input.urls is None:
        given = "tuning.input.volumeSource" if tuning.input.volume_source is not None else "tuning.input.image"
        raise PipelineError(f"{given} is not supported by the pipeline yet: give the dataset as tuning.input.urls")
    scheduled = tuning.schedule is not None
    scheduling, instance_type = _tuning_scheduling(workspace, preset)
    push_secret = output.image_push_secret
    docker_config = target.docker_config(push_secret)
    config_file = target.training_config(tuning.config)
    model_secret = getattr(getattr(tuning.preset, "preset_options", None), "model_access_secret", None)

    metadata = _metadata(workspace, "tuning")
    spec = _workflow_spec(workspace, target, "tuning", _data_volume_gib(preset),
                          [push_secret] if push_secret else [], tuning.config)
    # What a user changes when resubmitting (argo submit -p / resubmit): workflow arguments the
    # tasks reference, instead of values baked into their command lines.
    urls_secret = target.dataset_urls_secret if isinstance(target, ClusterTarget) else None
    urls_file = f"{CLUSTER_DATASET_URLS_DIR}/{DATASET_URLS_SECRET_KEY}"
    # Signed URLs (the operator put them in a Secret) are neither workflow arguments nor step arguments.
    dataset = {} if urls_secret else _dataset_arguments([target.dataset_url(u) for u in tuning.input.urls])
    if urls_secret:
        urls_volume = m.Volume(name=tasks.DATASET_URLS_VOLUME, secret=m.SecretVolumeSource(
            secret_name=urls_secret, items=[m.KeyToPath(key=DATASET_URLS_SECRET_KEY, path=DATASET_URLS_SECRET_KEY)]))
        spec["volumes"] = [*(spec.get("volumes") or []), urls_volume]
    repository = _repository(output.image)
    arguments = dict(dataset)
    if scheduled:
        arguments["output-repository"] = (repository, "OCI repository the adapters are pushed to (new tag each run)")
    else:
        arguments["output-image"] = (output.image, "OCI reference the adapter is pushed to")
    if tuning.config is None:  # with a training config, its file holds the epochs
        arguments["epochs"] = (DEFAULT_EPOCHS, "passes over the training data")
    arguments |= _release_arguments(workspace, target)
    spec["arguments"] = _arguments(arguments)
    if scheduled:
        # Each run the CronWorkflow starts carries the same labels and owner annotation.
        run_metadata = m.WorkflowMetadata(labels=metadata["labels"], annotations={
            ANNOTATION_OWNER: metadata["annotations"][ANNOTATION_OWNER]})
        workflow: Workflow | CronWorkflow = CronWorkflow(
            **metadata, **spec, workflow_metadata=run_metadata, schedules=[tuning.schedule], timezone="Etc/UTC", concurrency_policy="Forbid",
            starting_deadline_seconds=3600, successful_jobs_history_limit=3, failed_jobs_history_limit=3,
        )
        # A CronWorkflow has a name, not a generateName; its runs get <name>-<timestamp>.
        workflow.name, workflow.generate_name = cron_workflow_name(name), None
    else:
        workflow = Workflow(**metadata, **spec)

    mounts = tasks.docker_config_mount(target, push_secret)
    annotations = {
        LABEL_WORKSPACE: f"{namespace}/{name}",
        ANNOTATION_PRESET: preset.name,
        ANNOTATION_METHOD: tuning.method,
        ANNOTATION_DATASET_DIGEST: tasks.input_ref("dataset-digest"),
    }
    with workflow:
        provision_t = _provision_template(workspace, target, instance_type)
        # fetch-dataset is the data volume's first consumer: on the GPU node, a WaitForFirstConsumer
        # class makes the disk in that node's zone (a zonal disk elsewhere could never attach to it)
        fetch_t = tasks.fetch_dataset(target, urls=[tasks.workflow_ref(p) for p in dataset], config=config_file,
                                      config_map=tuning.config, scheduling=scheduling.placement_only(),
                                      url_file=urls_file if urls_secret else None)
        tune_t = tasks.tune(
            target, preset=preset.name, method=tuning.method, adapter_name=name, config=config_file,
            config_map=tuning.config, scheduling=scheduling, deadline=_tune_deadline(preset),
            model_access_secret=model_secret, epochs=tasks.workflow_ref("epochs") if "epochs" in arguments else None,
        )
        deploy_t = tasks.deploy(
            target, workspace_name=name, namespace=namespace, preset=preset.name, adapters=[(name, "1.0")],
            # the reference push-adapter actually pushed (with --tag auto it is only known then)
            adapter_images=[f"{name}={tasks.input_ref('adapter-image')}"], inputs=["adapter-image"],
            gpus=scheduling.gpus, node_labels=_node_labels(workspace), docker_config_secret=push_secret,
            workspace_uid=workspace.metadata.uid, model_access_secret=model_secret,
            api_key_secret=api_key_secret(workspace), registry_image=repository,
        )
        smoke_t = tasks.smoke_test(target, api_key_secret=api_key_secret(workspace),
                                   model=served_model_name(preset.name))
        if scheduled:
            repository_ref = tasks.workflow_ref("output-repository")
            gate_t = tasks.eval_gate(target, adapter_name=name, current_image=f"{repository_ref}:latest",
                                     docker_config=docker_config, mounts=mounts, registry_image=repository,
                                     same_rows=True, scheduling=scheduling)
            push_t = tasks.push_adapter(target, adapter_name=name, image=repository_ref, tag="auto", also_tag="latest",
                                        docker_config=docker_config, annotations=annotations, mounts=mounts,
                                        registry_image=repository)
            candidate_t = tasks.push_adapter(target, adapter_name=name, image=repository_ref, tag="auto",
                                             docker_config=docker_config, annotations=annotations, mounts=mounts,
                                             registry_image=repository, name=TASK_PUSH_CANDIDATE)
        else:
            push_t = tasks.push_adapter(target, adapter_name=name, image=tasks.workflow_ref("output-image"),
                                        docker_config=docker_config, annotations=annotations, mounts=mounts,
                                        registry_image=output.image)
        on_exit = _exit_handler(workspace, target)

        with DAG(name="tuning"):
            digest = {"dataset-digest": task_output_ref(TASK_FETCH_DATASET, OUTPUT_DATASET_DIGEST)}
            pushed = {"adapter-image": task_output_ref(TASK_PUSH_ADAPTER, OUTPUT_IMAGE)}
            provision = provision_t(name=TASK_PROVISION)
            fetch_dataset_task = fetch_t(name=TASK_FETCH_DATASET)
            train = tune_t(name=TASK_TUNE, arguments=digest)
            provision >> fetch_dataset_task >> train
            if scheduled:
                promoted = task_output_ref(TASK_EVAL_GATE, OUTPUT_PROMOTE)
                gate = gate_t(name=TASK_EVAL_GATE)
                push = push_t(name=TASK_PUSH_ADAPTER, arguments=digest, when=f"{promoted} == true")
                candidate = candidate_t(name=TASK_PUSH_CANDIDATE, arguments=digest, when=f"{promoted} != true")
                train >> gate >> [push, candidate]
                deploy = deploy_t(name=TASK_DEPLOY, depends=f"{TASK_PUSH_ADAPTER}.Succeeded", arguments=pushed)
            else:
                push = push_t(name=TASK_PUSH_ADAPTER, arguments=digest)
                train >> push
                deploy = deploy_t(name=TASK_DEPLOY, arguments=pushed)
                push >> deploy
            smoke_t(name=TASK_SMOKE_TEST, depends=f"{TASK_DEPLOY}.Succeeded",
                    arguments={OUTPUT_SERVICE_URL: task_output_ref(TASK_DEPLOY, OUTPUT_SERVICE_URL)})
    workflow.on_exit = on_exit
    return workflow


# -- inference ----------------------------------------------------------------------------------


def _inference(workspace: Workspace, target: Target, service_env: dict[str, str] | None = None) -> Workflow:
    inference = workspace.inference
    if inference.preset is None:
        raise PipelineError("inference.template is not supported: use inference.preset")
    preset = get_preset(inference.preset.name)
    name = workspace.metadata.name
    namespace = workspace.namespace
    adapters = list(inference.adapters or [])
    pull_secrets = [s for a in adapters for s in (a.source.image_pull_secrets or [])]
    # pull_adapters reads one docker config; the first secret named is used for every adapter.
    pull_secret = pull_secrets[0] if pull_secrets else None
    sku, instance_type = _inference_instance(workspace, preset)

    workflow = Workflow(**_metadata(workspace, "inference"),
                        **_workflow_spec(workspace, target, "inference", 10, [pull_secret] if pull_secret else [], None),
                        arguments=_arguments(_release_arguments(workspace, target)) or None)
    with workflow:
        on_exit = _exit_handler(workspace, target)
        provision_t = _provision_template(workspace, target, instance_type)
        pull_t = None
        if adapters:
            pull_t = tasks.pull_adapters(
                target, adapters=[f"{a.source.name}={a.source.image}" for a in adapters],
                docker_config=target.docker_config(pull_secret), mounts=tasks.docker_config_mount(target, pull_secret),
            )
        deploy_t = tasks.deploy(
            target, workspace_name=name, namespace=namespace, preset=preset.name,
            adapters=[(a.source.name, a.strength or "1.0") for a in adapters],
            adapter_images=[f"{a.source.name}={a.source.image}" for a in adapters], gpus=sku.gpus,
            node_labels=_node_labels(workspace), docker_config_secret=pull_secret,
            workspace_uid=workspace.metadata.uid,
            service_env=service_env,
            model_access_secret=getattr(workspace.inference.preset.preset_options, "model_access_secret", None)
            if workspace.inference.preset and workspace.inference.preset.preset_options else None,
            api_key_secret=api_key_secret(workspace),
        )
        smoke_t = tasks.smoke_test(target, api_key_secret=api_key_secret(workspace),
                                   model=(service_env or {}).get(SERVED_NAME_ENV) or served_model_name(preset.name))
        with DAG(name="inference"):
            provision = provision_t(name=TASK_PROVISION)
            pull = pull_t(name=TASK_PULL_ADAPTERS) if pull_t is not None else None
            deploy = deploy_t(name=TASK_DEPLOY)
            if pull is not None:
                provision >> pull >> deploy
            else:
                provision >> deploy
            smoke_t(name=TASK_SMOKE_TEST, depends=f"{TASK_DEPLOY}.Succeeded",
                    arguments={OUTPUT_SERVICE_URL: task_output_ref(TASK_DEPLOY, OUTPUT_SERVICE_URL)})
    workflow.on_exit = on_exit
    return workflow


def _inference_instance(workspace: Workspace, preset: Preset) -> tuple[Sku, str | None]:
    return defaults.node_sku(workspace), defaults.instance_type(workspace)
