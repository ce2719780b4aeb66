"""Kaito's tuning config (``training_config.yaml``): read, check every key, explain what applies.

Kaito's ``tuning.config`` names a ConfigMap whose ``training_config.yaml`` holds::

    training_config:
      ModelConfig:        # AutoModelForCausalLM.from_pretrained keywords (+ chat_template)
      QuantizationConfig: # transformers.BitsAndBytesConfig
      LoraConfig:         # peft.LoraConfig
      TrainingArguments:  # transformers.TrainingArguments
      DataCollator:       # transformers.DataCollatorForLanguageModeling
      DatasetConfig:      # Kaito's dataset options (shuffle, split, column names)

Kaito feeds each section through ``HfArgumentParser`` and fails on an unknown key with an
argparse message that names neither the section nor the key's place. Here each section is checked
against the field names of the very class it configures (imported lazily: these are the heavy
libraries the tune step needs anyway), and an unknown key fails with its full path and the
closest valid names: ``training_config.LoraConfig.rank: unknown key (did you mean 'r'?)``.

The file may be the bare YAML, or a whole ConfigMap manifest (its ``data.training_config.yaml``
is used), so ``kubectl get configmap -o yaml`` output works locally as it is.

What kaiflow does with each section is decided in ``steps.tune.plan`` (one function per layer): the
workflow owns paths, checkpointing and the dataset split, so keys that would fight those are
reported as ignored rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from pathlib import Path
from typing import Any

import yaml

from stepkit.common import REMOTE_CODE_ENV, StepError

SECTIONS = ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator", "DatasetConfig")

# Kaito's own dataclasses (presets/workspace/tuning/text-generation/cli.py); their fields are
# Kaito's API, not a library's, so they are listed here.
KAITO_MODEL_CONFIG_KEYS = (
    "pretrained_model_name_or_path", "state_dict", "cache_dir", "from_tf", "force_download", "resume_download",
    "proxies", "output_loading_info", "local_files_only", "revision", "trust_remote_code", "load_in_4bit",
    "load_in_8bit", "torch_dtype", "device_map", "chat_template", "attn_implementation",
)
KAITO_DATASET_CONFIG_KEYS = (
    "dataset_path", "dataset_extension", "shuffle_dataset", "shuffle_seed", "context_column", "response_column",
    "messages_column", "train_test_split",
)
KAITO_LORA_EXTRA_KEYS = ("init_lora_weights", "layers_to_transform", "layers_pattern", "loftq_config")


def _dataclass_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _init_keys(cls) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs", "args")}


def allowed_keys(section: str) -> set[str]:
    if section == "ModelConfig":
        return set(KAITO_MODEL_CONFIG_KEYS)
    if section == "DatasetConfig":
        return set(KAITO_DATASET_CONFIG_KEYS)
    if section == "QuantizationConfig":
        from transformers import BitsAndBytesConfig

        return _init_keys(BitsAndBytesConfig) | {"quant_method"}
    if section == "LoraConfig":
        from peft import LoraConfig

        return _dataclass_keys(LoraConfig) | set(KAITO_LORA_EXTRA_KEYS)
    if section == "TrainingArguments":
        from trl import SFTConfig  # TrainingArguments plus trl's SFT fields (packing, max_length, ...)

        return _dataclass_keys(SFTConfig)
    if section == "DataCollator":
        from transformers import DataCollatorForLanguageModeling

        return _dataclass_keys(DataCollatorForLanguageModeling) - {"tokenizer"}
    raise KeyError(section)


def read_training_config(source: str | Path) -> dict[str, dict[str, Any]]:
    """The six sections (missing ones empty), every key checked; StepError names what is wrong."""
    path = Path(source)
    if not path.is_file():
        raise StepError(f"--config: no such file {path}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StepError(f"--config {path}: not valid YAML: {exc}") from None
    if isinstance(document, dict) and document.get("kind") == "ConfigMap":
        data = document.get("data") or {}
        if "training_config.yaml" not in data:
            raise StepError(f"--config {path}: the ConfigMap has no data key 'training_config.yaml' (has: {sorted(data)})")
        try:
            document = yaml.safe_load(data["training_config.yaml"])
        except yaml.YAMLError as exc:
            raise StepError(f"--config {path}: data.training_config.yaml is not valid YAML: {exc}") from None
    if not isinstance(document, dict) or "training_config" not in document:
        raise StepError(f"--config {path}: expected a top-level 'training_config:' mapping (Kaito's format)")
    extra_top = sorted(set(document) - {"training_config"})
    if extra_top:
        raise StepError(f"--config {path}: {extra_top[0]}: unknown top-level key (only 'training_config' is read)")
    config = document["training_config"] or {}
    if not isinstance(config, dict):
        raise StepError(f"--config {path}: training_config must be a mapping of sections")
    sections: dict[str, dict[str, Any]] = {}
    for name, body in config.items():
        if name not in SECTIONS:
            raise StepError(f"training_config.{name}: unknown section{_hint(name, SECTIONS)}; expected {', '.join(SECTIONS)}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise StepError(f"training_config.{name}: must be a mapping of keys, got {type(body).__name__}")
        known = allowed_keys(name)
        for key in body:
            if key not in known:
                raise StepError(f"training_config.{name}.{key}: unknown key{_hint(key, known)}")
        sections[name] = dict(body)
    if (sections.get("ModelConfig") or {}).get("trust_remote_code") and os.environ.get(REMOTE_CODE_ENV) == "refuse":
        raise StepError("training_config.ModelConfig.trust_remote_code: refused in this cluster: it runs the model "
                        "repository's own code in the tune pod, which holds the model-access token and the data volume "
                        "later steps read; an admin may allow it for this namespace or model (the controller's "
                        "--allow-remote-code)")
    return {name: sections.get(name, {}) for name in SECTIONS}


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), sorted(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
