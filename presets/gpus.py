"""The Azure GPU SKU catalog, and whether a preset fits a SKU."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from presets.catalog import Preset
from presets.sizing import GIB, MemoryEstimate, estimate_inference, estimate_tuning


METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}


@dataclass(frozen=True)
class Sku:
    name: str
    gpu: str
    gpus: int
    gpu_memory_gib: int
    vcpus: int
    memory_gib: int

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
    """None when the preset fits, else a sentence saying why not."""
    sku = get_sku(instance_type)
    need = requirement(preset, method)
    if need.total_bytes <= _usable_gib(sku, method) * GIB:
        return None
    what = f"{METHOD_NAMES[method]} tuning" if method else "inference"
    where = "on one GPU" if method else "across the node's GPUs"
    return f"{sku.describe()}; {preset.name} {what} needs ≈{need.total_gib:.1f} GiB {where}"


def pick_instance(preset: Preset, method: str | None) -> Sku:
    """The smallest SKU that fits: least usable GPU memory, then fewest GPUs, then fewest vCPUs."""
    need = requirement(preset, method).total_bytes
    fitting = [s for s in skus().values() if _usable_gib(s, method) * GIB >= need]
    if not fitting:
        raise ValueError(f"no known GPU SKU fits {preset.name} ({need / GIB:.1f} GiB)")
    return min(fitting, key=lambda s: (_usable_gib(s, method), s.gpus, s.vcpus))
