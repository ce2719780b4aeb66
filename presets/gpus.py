"""The Azure GPU SKU catalog, and whether a preset fits a SKU."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from presets.catalog import Preset
from presets.sizing import GIB, MemoryEstimate, estimate_inference, estimate_tuning, kaito_gpus_needed

METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class Sku:
    name: str
    gpu: str
    gpus: int
    gpu_memory_gib: int
    vcpus: int
    memory_gib: int
    vendor: str = "nvidia"
    usd_per_hour: float = 0.0  # list price, to rank SKUs of equal GPU count (gpus.yaml)

    @property
    def total_gpu_memory_gib(self) -> int:
        return self.gpus * self.gpu_memory_gib

    def describe(self) -> str:
        return f"{self.name} has {self.gpus}×{self.gpu_memory_gib} GiB {self.gpu}"


class UnknownSkuError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


@cache
def skus() -> dict[str, Sku]:
    raw = yaml.safe_load(resources.files("presets").joinpath("gpus.yaml").read_text())
    return {name: Sku(name=name, **spec) for name, spec in raw["skus"].items()}


# Kaito accepts an Azure name outside its table when it starts with one of these (GPU and
# general-purpose families), skipping the memory check.
UNCHECKED_PREFIXES = ("Standard_N", "Standard_D")


def lookup_sku(name: str) -> Sku | None:
    """The SKU from the table, or None for a name Kaito lets through unchecked."""
    if name in skus():
        return skus()[name]
    if name.startswith(UNCHECKED_PREFIXES):
        return None
    get_sku(name)  # raises with the closest names
    return None


def get_sku(name: str) -> Sku:
    try:
        return skus()[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(skus()), n=3, cutoff=0.5)
        hint = f"; closest known: {', '.join(close)}" if close else f"; known: {', '.join(skus())}"
        raise UnknownSkuError(f"unknown GPU instance type {name!r}{hint}") from None


def requirement(preset: Preset, method: str | None) -> MemoryEstimate:
    """What must fit: tuning needs it on one GPU; inference may shard across a node's GPUs."""
    return estimate_tuning(preset, method) if method else estimate_inference(preset)


def _usable_gib(sku: Sku, method: str | None) -> int:
    # QLoRA/LoRA tuning runs the model on one GPU (data parallel replicas do not pool memory);
    # inference shards a model over all GPUs of the node with tensor parallelism.
    return sku.gpu_memory_gib if method else sku.total_gpu_memory_gib


def check_fit(instance_type: str, preset: Preset, method: str | None) -> str | None:
    """None when the preset fits one node of the SKU, else a sentence saying why not.

    Inference must fit by both estimates: Kaito's node estimator (how many nodes Kaito would
    provision; kaiflow serves on one) and kaiflow's own (presets.sizing, the stricter of the two
    for small GPUs). Tuning uses kaiflow's on one GPU.
    """

    sku = get_sku(instance_type)
    if method is None:
        try:
            gpus = kaito_gpus_needed(preset, sku.gpu_memory_gib)
        except ValueError:
            gpus = None
        if gpus is None or gpus > sku.gpus:
            count = f"{-(-gpus // sku.gpus)} such nodes ({gpus} GPUs" if gpus else "more than 1024 GPUs ("
            return (f"{sku.describe()}; {preset.name} inference needs {count} by Kaito's node estimate), "
                    "but kaiflow serves a model on one node")
    need = requirement(preset, method)
    if need.total_bytes <= _usable_gib(sku, method) * GIB:
        return None
    what = f"{METHOD_NAMES[method]} tuning" if method else "inference"
    where = "on one GPU" if method else "across the node's GPUs"
    return f"{sku.describe()}; {preset.name} {what} needs ≈{need.total_gib:.1f} GiB {where}"


def host_memory_fits(sku: Sku, preset: Preset, method: str | None) -> bool:
    """Whether the node's RAM holds what the serving pod requests (the weights + 4 GiB, as
    steps.deploy.manifests.sizes_for_weights asks), within the 80 % the tune pod may take too."""
    if method is not None or not preset.sized:
        return True
    weights_gib = estimate_inference(preset).parts["weights"] / GIB
    return weights_gib + 4 <= sku.memory_gib * 0.8


def pick_instance(preset: Preset, method: str | None) -> Sku:
    """The SKU for a Workspace with no instanceType: the fewest GPUs that hold the model, then the cheapest.

    Fewest GPUs first: QLoRA/LoRA on a model that fits one GPU gains nothing a larger node would
    justify (8 small GPUs cost ~7x one 80 GiB GPU and fail on most subscriptions' quota); then the
    list price (gpus.yaml), then fewer vCPUs. A node must also hold the serving pod's RAM request.
    """
    # Only NVIDIA SKUs: kaiflow's pods request nvidia.com/gpu.
    fitting = [s for s in skus().values() if s.vendor == "nvidia" and check_fit(s.name, preset, method) is None
               and host_memory_fits(s, preset, method)]
    if not fitting:
        need = requirement(preset, method).total_bytes
        raise ValueError(f"no known GPU SKU fits {preset.name} ({need / GIB:.1f} GiB)")
    return min(fitting, key=lambda s: (s.gpus, s.usd_per_hour, s.vcpus, s.name))
