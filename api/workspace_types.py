"""The Workspace custom resource (group ``kaito.sh``) as one typed model.

Kaito keeps ``resource``, ``inference`` and ``tuning`` at the top level of the object (there is no
``spec``), and kaiflow accepts Kaito users' YAML unchanged. Field names are Kaito's camelCase on
the wire (aliases) and snake_case in Python. Unknown fields are rejected (``extra="forbid"``) so a
typo never disappears silently.

This module only describes shapes and types. Kaito's rules that relate fields to each other, to
the preset catalog or to the GPU catalog live in ``api.workspace_validation``; the CRD schema is
generated from these classes by ``api.crd``. kaiflow's own additions (``tuning.schedule``) carry
``x-kaiflow-extension`` in their schema, and fields Kaito has but kaiflow refuses carry
``x-kaiflow-unsupported`` with the reason: validation reports them as ``unsupported: <path>``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from api.defaults import DEFAULT_COUNT, DEFAULT_METHOD
from api.workspace_status import STATES, Performance, PipelineStatus

GROUP = "kaito.sh"
KIND = "Workspace"
VERSIONS = ("v1alpha1", "v1beta1")
STORAGE_VERSION = "v1beta1"
API_VERSIONS = tuple(f"{GROUP}/{v}" for v in VERSIONS)

TuningMethod = Literal["lora", "qlora"]


def unsupported(reason: str, **kwargs: Any) -> Any:
    """A Kaito field kaiflow accepts in the schema but refuses in validation, with why."""
    return Field(default=None, json_schema_extra={"x-kaiflow-unsupported": reason}, **kwargs)


def extension(description: str, **kwargs: Any) -> Any:
    """A kaiflow field that Kaito does not have."""
    return Field(default=None, description=description, json_schema_extra={"x-kaiflow-extension": True}, **kwargs)


class KaitoModel(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class LabelSelectorRequirement(KaitoModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(KaitoModel):
    match_labels: dict[str, str] | None = Field(default=None, description="node labels that must all match")
    match_expressions: list[LabelSelectorRequirement] | None = None


class GPUPartition(KaitoModel):
    mode: Literal["mig", "accelerator"] = Field(description="mig (NVIDIA Multi-Instance GPU) or accelerator (whole GPUs)")
    count: int | None = Field(default=None, ge=1, description="whole GPUs, for mode accelerator")
    profile: str | None = Field(default=None, description='MIG profile such as "1g.10gb"')


class ResourceSpec(KaitoModel):
    """The GPU nodes a Workspace runs on."""

    count: int = Field(default=DEFAULT_COUNT, ge=1, description="number of GPU nodes")
    instance_type: str | None = Field(
        default=None,
        description="Azure GPU VM size, e.g. Standard_NC24ads_A100_v4; when omitted kaiflow picks the "
        "smallest SKU whose GPU memory fits the preset",
    )
    label_selector: LabelSelector = Field(description="labels the provisioned nodes carry and pods select")
    preferred_nodes: list[str] | None = Field(default=None, description="existing nodes to use before provisioning new ones")
    partition: GPUPartition | None = unsupported("GPU partitioning (MIG) needs Kaito's enableMIG gate; kaiflow schedules whole GPUs")


class PresetOptions(KaitoModel):
    image: str | None = Field(default=None, description="deprecated in Kaito v1beta1 and ignored: weights come from the model source")
    image_pull_secrets: list[str] | None = None
    model_access_secret: str | None = Field(
        default=None, description="Secret holding an HF_TOKEN for gated models (referenced, never copied)"
    )


class PresetSpec(KaitoModel):
    name: str = Field(description="model preset name, see `kaiflow presets`")
    access_mode: Literal["public", "private"] | None = Field(default=None, description="deprecated in Kaito v1beta1 and ignored")
    preset_options: PresetOptions | None = None


class DataSource(KaitoModel):
    name: str | None = None
    urls: list[str] | None = Field(default=None, description="http, https or file URLs of parquet/jsonl/json/csv files")
    volume_source: dict[str, Any] | None = Field(default=None, description="a Kubernetes VolumeSource holding the data")
    image: str | None = Field(default=None, description="an OCI image holding the data")
    image_pull_secrets: list[str] | None = None


class DataDestination(KaitoModel):
    volume_source: dict[str, Any] | None = Field(default=None, description="a Kubernetes VolumeSource to write the adapter to")
    image: str | None = Field(default=None, description="OCI reference the adapter is pushed to")
    image_push_secret: str | None = Field(default=None, description="docker-config Secret used to push (referenced, never copied)")


class AdapterSpec(KaitoModel):
    source: DataSource
    strength: str | None = Field(default=None, description='weight of the adapter, a decimal string in [0, 1], e.g. "0.5"')


class InferenceSpec(KaitoModel):
    preset: PresetSpec | None = None
    template: dict[str, Any] | None = unsupported(
        "custom pod templates are not supported; use a preset", description="a PodTemplateSpec"
    )
    adapters: list[AdapterSpec] | None = None
    config: str | None = Field(
        default=None, description="ConfigMap with inference_config.yaml; kaiflow applies vllm.max-model-len and "
        "vllm.served-model-name and ignores the rest (with a warning naming each key)"
    )


class TuningSpec(KaitoModel):
    preset: PresetSpec
    method: TuningMethod = Field(default=DEFAULT_METHOD, description="lora (full-precision base) or qlora (4-bit NF4 base)")
    config: str | None = Field(
        default=None, description="ConfigMap with training_config.yaml (in local mode: a file path)"
    )
    input: DataSource
    output: DataDestination
    schedule: str | None = extension(
        "cron expression (5 fields, UTC, or Argo's @daily/@weekly/.../@every <duration>) for scheduled retuning; "
        "the new adapter is rolled out only if its "
        "held-out loss is no worse than the one serving"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _method_lowercased(cls, value: Any) -> Any:
        # Kaito compares the method lowercased (QLoRA == qlora).
        return value.lower() if isinstance(value, str) else value


class ObjectMeta(BaseModel):
    """Kubernetes metadata: kaiflow reads name, namespace, labels, annotations and uid."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    generation: int | None = None


class Condition(KaitoModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class WorkspaceStatus(BaseModel):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)

    conditions: list[Condition] | None = None
    worker_nodes: list[str] | None = None
    # Kaito's; state is one of api.workspace_status.STATES.
    state: str | None = Field(default=None, description=f"high-level state: {', '.join(STATES)}")
    target_node_count: int | None = Field(default=None, description="GPU nodes the Workspace needs")
    performance: Performance | None = None
    # kaiflow's own.
    observed_generation: int | None = Field(default=None, description="the generation this status describes")
    pipeline: PipelineStatus | None = Field(default=None, description="the Argo Workflow or CronWorkflow that runs it")


class Workspace(KaitoModel):
    api_version: Literal["kaito.sh/v1alpha1", "kaito.sh/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["Workspace"]
    metadata: ObjectMeta
    resource: ResourceSpec | None = None
    inference: InferenceSpec | None = None
    tuning: TuningSpec | None = None
    status: WorkspaceStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def preset_name(self) -> str | None:
        spec = self.tuning or self.inference
        return spec.preset.name if spec and spec.preset else None

    @property
    def is_tuning(self) -> bool:
        return self.tuning is not None
