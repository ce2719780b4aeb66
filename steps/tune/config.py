"""The tune step's typed config: one ``--flag`` per field (``stepkit.common.add_dataclass_arguments``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TuneConfig:
    preset: str = field(metadata={"help": "model preset name (presets/models.yaml)"})
    method: str = field(metadata={"help": "lora (full-precision base) or qlora (4-bit NF4 base)", "choices": ["lora", "qlora"]})
    dataset_dir: Path = field(metadata={"help": "folder with train.parquet and eval.parquet from fetch_dataset"})
    output_dir: Path = field(metadata={"help": "where the adapter, kaiflow.json, loss.json and loss.png are written "
                                               "(replaced as a whole once training finished)"})
    checkpoint_dir: Path = field(metadata={"help": "where checkpoints go; a rerun resumes from the newest"})
    config: Path | None = field(default=None, metadata={"help": "Kaito training_config.yaml (or a ConfigMap manifest holding it)"})
    dataset_digest: str | None = field(default=None, metadata={"help": "digest of the dataset (default: summary.json's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps (default: epochs)"})
    skip_initial_eval: bool = field(default=False, metadata={"help": "do not measure the held-out loss before training"})
    eval_points: int = field(default=10, metadata={
        "help": "measure the held-out loss about this many times during the run (0: only at the end); "
                "TrainingArguments.eval_strategy in --config takes precedence"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training set when --max-steps is not set (default 1)"})
    batch_size: int | None = field(default=None, metadata={"help": "packed sequences per step per device (default 1 on CPU, 2 on CUDA)"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per packed sequence (default 512 on CPU, 2048 on CUDA)"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default 2e-4)"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps (default 50)"})
    logging_steps: int | None = field(default=None, metadata={"help": "log the training loss every N steps (default 1)"})
    seed: int | None = field(default=None, metadata={"help": "random seed (default 42)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": ["auto", "cpu", "cuda"]})
    nproc: int | None = field(default=None, metadata={
        "help": "data-parallel processes, one per GPU (default: the visible CUDA devices, 1 on CPU); "
                "the global batch stays the plan's"})
