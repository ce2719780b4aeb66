"""Kaito's ``DatasetConfig`` (from the tuning ``training_config.yaml``) as the fetch step applies it.

Kaito's tuning ConfigMap may say which columns hold the data and how to split it::

    training_config:
      DatasetConfig:
        messages_column: conversation   # OpenAI-style messages (a list, or JSON text)
        context_column: question        # with response_column: user turn ...
        response_column: answer         # ... and assistant turn; alone: plain text
        train_test_split: 0.9           # share of rows for training (1: no held-out set)
        shuffle_seed: 7
        dataset_extension: parquet      # the file type when the URL does not say

What kaiflow does with each key (``DatasetSettings.notes`` records it in ``summary.json``):

* ``messages_column`` → that column is read as ``messages``; ``context_column`` +
  ``response_column`` → ``prompt``/``completion`` (a user turn and an assistant turn);
  ``response_column`` alone → ``text``. The named columns must exist in every file; the
  automatic format detection is then not used.
* ``train_test_split`` → the held-out share is ``1 - train_test_split`` (0.5 .. 1 accepted);
  ``shuffle_seed`` → the seed of that split.
* ``dataset_extension`` → the file type when the URL's extension does not tell it.
* ``shuffle_dataset`` → nothing here: the tune step's trainer shuffles every epoch anyway.
  ``dataset_path`` → ignored: the workflow fetches ``tuning.input.urls``.

The other sections belong to the tune step, which checks them with the heavy libraries they
configure; this module reads only ``DatasetConfig`` so the fetch step stays light. The file may be
the bare YAML or a whole ConfigMap manifest, as for ``steps.tune --config``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stepkit.common import StepError
from steps.fetch_dataset.readers import KAITO_EXTENSIONS
from steps.tune.kaito_training_config import KAITO_DATASET_CONFIG_KEYS

PREFIX = "training_config.DatasetConfig"


@dataclass(frozen=True)
class ColumnMapping:
    """Which format the mapped columns make, and file column → canonical column."""

    format: str
    columns: dict[str, str]  # canonical name (messages, prompt, completion, text) -> file column
    keys: dict[str, str]  # canonical name -> the DatasetConfig key that named it, for messages

    def source_columns(self) -> list[str]:
        return list(dict.fromkeys(self.columns.values()))

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        return {canonical: row.get(source) for canonical, source in self.columns.items()}


@dataclass(frozen=True)
class DatasetSettings:
    mapping: ColumnMapping | None = None
    eval_fraction: float | None = None
    seed: int | None = None
    extension: str | None = None
    notes: list[str] = field(default_factory=list)


def read_dataset_config(source: str | Path) -> DatasetSettings:
    """The DatasetConfig section of Kaito's training config; ``StepError`` names a bad key."""
    section = _dataset_section(Path(source))
    unknown = sorted(set(section) - set(KAITO_DATASET_CONFIG_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], KAITO_DATASET_CONFIG_KEYS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StepError(f"{PREFIX}.{unknown[0]}: unknown key{hint}")
    names = {key: _column(section, key) for key in ("messages_column", "context_column", "response_column")}
    notes: list[str] = []
    mapping = None
    if names["messages_column"]:
        if names["context_column"]:
            raise StepError(f"{PREFIX}: give messages_column or context_column/response_column, not both")
        mapping = ColumnMapping("messages", {"messages": names["messages_column"]}, {"messages": "messages_column"})
    elif names["context_column"]:
        if not names["response_column"]:
            raise StepError(f"{PREFIX}.context_column: needs response_column too (the assistant's answer)")
        mapping = ColumnMapping("prompt", {"prompt": names["context_column"], "completion": names["response_column"]},
                                {"prompt": "context_column", "completion": "response_column"})
    elif names["response_column"]:
        mapping = ColumnMapping("text", {"text": names["response_column"]}, {"text": "response_column"})
    if mapping:
        notes.append(f"DatasetConfig columns: {', '.join(f'{s} as {c}' for c, s in mapping.columns.items())}")

    eval_fraction = None
    if "train_test_split" in section:
        split = section["train_test_split"]
        if isinstance(split, bool) or not isinstance(split, int | float) or not 0.5 <= split <= 1:
            raise StepError(f"{PREFIX}.train_test_split: must be a number from 0.5 to 1 (the training share), "
                            f"got {split!r}")
        eval_fraction = round(1 - float(split), 10)
        notes.append(f"DatasetConfig.train_test_split {split}: eval fraction {eval_fraction:g}")
    seed = None
    if "shuffle_seed" in section:
        seed = section["shuffle_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise StepError(f"{PREFIX}.shuffle_seed: must be an integer, got {seed!r}")
        notes.append(f"DatasetConfig.shuffle_seed {seed}: seed of the train/eval split")
    extension = section.get("dataset_extension")
    if extension is not None:
        if extension not in KAITO_EXTENSIONS:
            raise StepError(f"{PREFIX}.dataset_extension: must be one of {', '.join(KAITO_EXTENSIONS)}, got {extension!r}")
        notes.append(f"DatasetConfig.dataset_extension {extension}: file type when the URL does not tell")
    if "shuffle_dataset" in section:
        if not isinstance(section["shuffle_dataset"], bool):
            raise StepError(f"{PREFIX}.shuffle_dataset: must be true or false, got {section['shuffle_dataset']!r}")
        notes.append("DatasetConfig.shuffle_dataset: left to the tune step (its trainer shuffles every epoch)")
    if "dataset_path" in section:
        notes.append("DatasetConfig.dataset_path ignored: the workflow fetches tuning.input.urls")
    return DatasetSettings(mapping, eval_fraction, seed, extension, notes)


def _column(section: dict[str, Any], key: str) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise StepError(f"{PREFIX}.{key}: must be a column name, got {value!r}")
    return value


def _dataset_section(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StepError(f"--config: no such file {path}")
    try:
        document = yaml.safe_load(path.read_text())
        if isinstance(document, dict) and document.get("kind") == "ConfigMap":
            data = document.get("data") or {}
            if "training_config.yaml" not in data:
                raise StepError(f"--config {path}: the ConfigMap has no data key 'training_config.yaml' (has: {sorted(data)})")
            document = yaml.safe_load(data["training_config.yaml"])
    except yaml.YAMLError as exc:
        raise StepError(f"--config {path}: not valid YAML: {exc}") from None
    if (not isinstance(document, dict) or "training_config" not in document
            or not isinstance(document["training_config"], dict | None)):
        raise StepError(f"--config {path}: expected a top-level 'training_config:' mapping (Kaito's format)")
    section = (document.get("training_config") or {}).get("DatasetConfig") or {}
    if not isinstance(section, dict):
        raise StepError(f"{PREFIX}: must be a mapping of keys, got {type(section).__name__}")
    return section
