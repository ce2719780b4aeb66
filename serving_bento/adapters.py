"""Loading the base model and combining the Workspace's adapters, each with its strength.

How adapters are combined
-------------------------
Kaito's transformers runtime loads every adapter of ``inference.adapters[]`` and folds them into
one with PEFT's ``add_weighted_adapter``. We do the same, with the ``cat`` method by default:

* ``cat`` concatenates the adapters' A and B matrices (B scaled by each weight), so the combined
  update is exactly ``sum_i strength_i * B_i A_i * scaling_i``: each adapter contributes its own
  update, scaled by its strength, whatever the ranks. It is exact and cheap.
* ``linear`` adds the A matrices and the B matrices separately (each times ``sqrt(weight)``).
  For one adapter that is exactly a rescale (measured: ``linear`` at 0.5 equals
  ``rescale_adapter_scale(0.5)``), but for two or more it creates cross terms ``B_i A_j`` that
  neither adapter learned, and it needs equal ranks.
* ``svd`` recomputes a low-rank factorisation of the exact sum: exact only up to the chosen rank
  and slow (~6 s per adapter on the test machine).

Adapters are fixed for the life of a pod (a new Workspace spec rolls a new Deployment), so by
default the combined adapter is merged into the base weights (``merge_and_unload``): decoding then
runs at base-model speed (14 vs 10-13 tok/s unmerged for SmolLM2 on a CPU).

Adapters as separate models (``KAIFLOW_ADAPTER_MODE=per-request``)
-------------------------------------------------------------------
Every adapter is loaded into one ``PeftModel`` and left unmerged, its LoRA scaling multiplied by
its strength (``LoraLayer.set_scale``: the update becomes ``strength * B A * alpha / r``, the same
update the merged mode adds for that adapter). The engine passes each row's adapter name to
the forward pass (``adapter_names``), so one batch mixes the base model and any adapters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving_bento.config import AdapterSpec, ConfigError, ServiceConfig

log = logging.getLogger("kaiflow.serving.adapters")

COMBINED_ADAPTER = "kaiflow-combined"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    context_length: int
    chat_template: str  # "native", "chatml" or "none"
    adapters: tuple[AdapterSpec, ...]
    per_request_adapters: tuple[str, ...] = ()  # names a request may choose (per-request mode)


def resolve_base(config: ServiceConfig) -> tuple[str, int | None, str]:
    """(what from_pretrained takes, the preset's context length or None, chat template mode)."""
    from presets.catalog import UnknownPresetError, get_preset
    from presets.local import resolve_model

    if Path(config.model).is_dir():
        return config.model, None, "native"
    try:
        preset = get_preset(config.model)
    except UnknownPresetError as exc:
        raise ConfigError(f"KAIFLOW_MODEL: {exc} (and no folder of that name exists)") from None
    return resolve_model(preset), preset.context_length, preset.chat_template


def check_adapter_folders(adapters: tuple[AdapterSpec, ...]) -> None:
    for spec in adapters:
        config_file = Path(spec.path) / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter {spec.name!r}: no adapter_config.json in {spec.path}")
        try:
            json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter {spec.name!r}: {config_file} is not JSON: {exc.msg}") from None


def load_model(config: ServiceConfig) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from presets.local import CHATML_TEMPLATE

    check_adapter_folders(config.adapters)
    source, preset_context, template_mode = resolve_base(config)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # V100 and T4 have no bf16: serve in fp16 there
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    per_request: tuple[str, ...] = ()
    if config.adapters and config.adapter_mode == "per-request":
        model = load_separate_adapters(model, config.adapters)
        per_request = tuple(a.name for a in config.adapters)
    elif config.adapters:
        model = apply_adapters(model, config.adapters, config.adapter_combination, merge=config.merge_adapters)
    model.eval()
    if template_mode == "chatml" or (template_mode == "native" and not tokenizer.chat_template):
        tokenizer.chat_template = CHATML_TEMPLATE
        template_mode = "chatml"
    context = preset_context or getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(model, tokenizer, int(context), template_mode, config.adapters, per_request)


def _load_all(model: Any, adapters: tuple[AdapterSpec, ...]) -> Any:
    from peft import PeftModel

    first, *rest = adapters
    try:
        peft_model = PeftModel.from_pretrained(model, first.path, adapter_name=first.name)
        for spec in rest:
            peft_model.load_adapter(spec.path, adapter_name=spec.name)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ConfigError(f"KAIFLOW_ADAPTERS: cannot load an adapter onto this base model: {exc}") from None
    return peft_model


def load_separate_adapters(model: Any, adapters: tuple[AdapterSpec, ...]) -> Any:
    """Every adapter loaded unmerged, at its strength, for requests to choose one per row."""
    from peft.tuners.lora import LoraLayer

    peft_model = _load_all(model, adapters)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for spec in adapters:
        for layer in layers:
            layer.set_scale(spec.name, spec.strength)
    log.info("serving adapters %s separately at strengths %s", [a.name for a in adapters],
             [a.strength for a in adapters])
    return peft_model


def apply_adapters(model: Any, adapters: tuple[AdapterSpec, ...], combination: str = "cat", merge: bool = True) -> Any:
    """Load every adapter, fold them into one weighted adapter, optionally merge it into the base."""
    peft_model = _load_all(model, adapters)
    names = [a.name for a in adapters]
    weights = [a.strength for a in adapters]
    method = combination
    if len(adapters) == 1 and method == "cat":
        method = "linear"  # one adapter: linear is an exact rescale and keeps the rank
    peft_model.add_weighted_adapter(names, weights, adapter_name=COMBINED_ADAPTER, combination_type=method)
    peft_model.set_adapter(COMBINED_ADAPTER)
    for name in names:
        peft_model.delete_adapter(name)
    log.info("combined adapters %s with strengths %s (%s)", names, weights, method)
    return peft_model.merge_and_unload() if merge else peft_model
