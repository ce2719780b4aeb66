"""The plan of a tune: every setting resolved, and the library objects that carry them.

Settings are layered, later wins: preset and device defaults → Kaito's ``training_config.yaml``
(checked key by key in ``steps.tune.kaito_training_config``) → command-line flags → what the
workflow must own (paths, checkpointing, reporting). Each layer is one small function below, and the plan ends as
the objects the libraries take — peft's ``LoraConfig``, trl's ``SFTConfig``, transformers'
``BitsAndBytesConfig`` — so a value the library rejects fails here, before any weights load,
with the section of ``training_config`` it came from. ``record`` keeps what was *chosen* (not the
libraries' hundred defaults) for ``kaiflow.json`` and for the resume identity.

Device rules:

* CPU: fp32 weights and fp32 compute everywhere — bf16 matmuls have no fast path on most CPUs
  (NF4 with bf16 compute measured 45 s/step against 5 s/step in fp32), so Kaito's bf16 settings
  are overridden and said so — and no gradient checkpointing, which only trades compute for memory
  a CPU host rarely lacks. trl's ``SFTConfig`` defaults ``bf16=True``: switched off on CPU.
* CUDA: bf16 where the GPU supports it (else fp16), gradient checkpointing on for QLoRA.
* ``qlora``: NF4 base with double quantisation (bitsandbytes); ``lora``: a full-precision base.

Heavy imports (torch, peft, trl, transformers) happen inside the functions.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepkit.common import StepError
from steps.tune.attention import NAME as PACKED_SDPA
from steps.tune.config import TuneConfig
from steps.tune.kaito_training_config import SECTIONS
from steps.tune.parallel import Ranks, split_batch

# No LoRA dropout by default, as Kaito's tuning template and peft: on a CPU a dropout of 0.05 cost 14 % of
# a step's time and kept a masked copy of every adapted layer's input (+60 % activation memory).
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
# TrainingArguments keys the workflow owns: a config that sets them is told they are ignored.
OWNED_KEYS = {
    "output_dir": "checkpoints go to --checkpoint-dir; the adapter to --output-dir",
    "overwrite_output_dir": "the checkpoint dir is managed by kaiflow",
    "save_strategy": "kaiflow checkpoints every save_steps so a retried step resumes (Kaito's 'epoch'/'no' loses work)",
    "resume_from_checkpoint": "kaiflow resumes from the newest complete checkpoint by itself",
    "push_to_hub": "the adapter is pushed by the push_adapter step",
    "hub_model_id": "the adapter is pushed by the push_adapter step",
    "hub_token": "the adapter is pushed by the push_adapter step",
}
# Settings that make a run resumable and quiet; never recorded as the run's choices.
WORKFLOW_TRAINING = {
    "save_strategy": "steps",
    "save_total_limit": 2,
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "include_num_input_tokens_seen": "all",  # padding-free batches hold no padding to exclude
    "dataset_num_proc": None,
}
# Changing these between a run and its rerun continues the same training.
RESUMABLE_CHANGES = ("max_steps", "save_steps", "logging_steps", "report_to")
# report_to values kaiflow honours; TensorBoard's event files are written under the checkpoint dir
# (so a resumed run appends to them) and copied into the adapter folder, which is pushed.
REPORTERS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Plan:
    """Everything the run will use, resolved; ``record`` is written to kaiflow.json."""

    device: str
    dtype: str
    model_kwargs: dict[str, Any]
    quantization: Any  # transformers.BitsAndBytesConfig | None
    lora: Any  # peft.LoraConfig
    training: Any  # trl.SFTConfig
    chat_template: str | None
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        """An explicit ``ModelConfig.pretrained_model_name_or_path``, else None (the preset's)."""
        return self.model_kwargs.get("pretrained_model_name_or_path")


def empty_sections() -> dict[str, dict[str, Any]]:
    return {name: {} for name in SECTIONS}


def detect_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise StepError("--device cuda: no CUDA device is visible")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def make_plan(cfg: TuneConfig, preset, sections: dict[str, dict[str, Any]], device: str, *,
              chat: bool = True, output_dir: Path | None = None, ranks: Ranks = Ranks()) -> Plan:
    """The plan for ``cfg`` on ``device``; ``chat`` rows train on assistant tokens only.

    ``output_dir`` is where the trainer writes checkpoints (default ``cfg.checkpoint_dir``).
    ``ranks``: this process's place in a data-parallel run; the global batch is divided among
    them (``steps.tune.parallel.split_batch``), everything else is the same on every rank.
    """
    notes: list[str] = []
    model_cfg = dict(sections.get("ModelConfig") or {})
    quant_cfg = dict(sections.get("QuantizationConfig") or {})
    dtype = compute_dtype(model_cfg, device, notes)
    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model_kwargs, template = model_settings(model_cfg, quant_cfg, device, flash, notes, ranks.local_rank)
    quant_record = quantization_settings(cfg.method, quant_cfg, dtype, device, notes)
    lora_record = lora_settings(preset, sections.get("LoraConfig") or {})
    training_record = training_settings(cfg, preset, sections, device, dtype, flash, notes)
    parallel, per_rank = parallel_settings(training_record, ranks, device, notes)
    record = {"lora": lora_record, "quantization": quant_record, "training": training_record, "parallel": parallel}
    return Plan(
        device=device,
        dtype=dtype,
        model_kwargs=model_kwargs,
        quantization=build_bnb_config(quant_record),
        lora=build_lora_config(lora_record),
        training=build_sft_config({**training_record, **per_rank}, output_dir or cfg.checkpoint_dir, chat),
        chat_template=template,
        notes=notes,
        record=record,
    )


# -- one function per layer ---------------------------------------------------------------------


def compute_dtype(model_cfg: dict[str, Any], device: str, notes: list[str]) -> str:
    """The weights' and compute dtype; pops ``torch_dtype`` from ``model_cfg``."""
    if device == "cuda":
        import torch

        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "float32"
    requested = model_cfg.pop("torch_dtype", None)
    if requested and device == "cpu" and requested != "float32":
        notes.append(f"ModelConfig.torch_dtype={requested} ignored on CPU: fp32 is several times faster there")
    elif requested and requested != "auto":
        dtype = requested
    return dtype


def model_settings(model_cfg: dict[str, Any], quant_cfg: dict[str, Any], device: str, flash: bool,
                   notes: list[str], local_rank: int = 0) -> tuple[dict[str, Any], str | None]:
    """``from_pretrained`` keywords and the chat-template setting; moves Kaito's load_in_* to quant_cfg."""
    # CPU: SDPA once per packed example (steps.tune.attention), not over the whole block-masked row
    default_attention = "flash_attention_2" if flash else PACKED_SDPA if device == "cpu" else "sdpa"
    model_kwargs: dict[str, Any] = {"attn_implementation": default_attention}
    for key in ("revision", "trust_remote_code", "attn_implementation", "local_files_only", "cache_dir"):
        if key in model_cfg:
            model_kwargs[key] = model_cfg.pop(key)
    # each data-parallel rank holds the whole (quantised) base on its own GPU
    model_kwargs["device_map"] = {"": local_rank} if device == "cuda" else "cpu"
    if "device_map" in model_cfg:
        notes.append("ModelConfig.device_map ignored: each process holds the model on its own device")
        model_cfg.pop("device_map")
    for key in ("load_in_4bit", "load_in_8bit"):  # Kaito accepts them in ModelConfig too
        if key in model_cfg:
            quant_cfg.setdefault(key, model_cfg.pop(key))
    source = model_cfg.pop("pretrained_model_name_or_path", None)
    if source:
        model_kwargs["pretrained_model_name_or_path"] = source
    template = model_cfg.pop("chat_template", None)
    for key in sorted(model_cfg):
        notes.append(f"ModelConfig.{key} ignored (no effect when loading a local preset)")
    return model_kwargs, template


def quantization_settings(method: str, quant_cfg: dict[str, Any], dtype: str, device: str,
                          notes: list[str]) -> dict[str, Any] | None:
    if method != "qlora":
        if quant_cfg.get("load_in_4bit") or quant_cfg.get("load_in_8bit"):
            raise StepError("training_config.QuantizationConfig: load_in_4bit/load_in_8bit contradict method lora (use method qlora)")
        return None
    if quant_cfg.get("load_in_4bit") is False or quant_cfg.get("load_in_8bit"):
        raise StepError("training_config.QuantizationConfig: method qlora needs load_in_4bit: true (and no load_in_8bit)")
    quant_cfg = dict(quant_cfg)
    quant_method = quant_cfg.pop("quant_method", "bitsandbytes")
    if quant_method != "bitsandbytes":
        raise StepError(f"training_config.QuantizationConfig.quant_method: {quant_method!r} is not supported (bitsandbytes)")
    settings = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": dtype,
    }
    settings.update(quant_cfg)
    if device == "cpu" and settings["bnb_4bit_compute_dtype"] != "float32":
        notes.append(
            f"QuantizationConfig.bnb_4bit_compute_dtype={settings['bnb_4bit_compute_dtype']} ignored on CPU: "
            "bf16 NF4 compute is ~9x slower there than fp32"
        )
        settings["bnb_4bit_compute_dtype"] = "float32"
    return settings


def lora_settings(preset, lora_cfg: dict[str, Any]) -> dict[str, Any]:
    settings = dict(DEFAULT_LORA, target_modules=list(preset.lora_target_modules))
    settings.update(lora_cfg)
    if not settings.get("target_modules"):
        settings["target_modules"] = list(preset.lora_target_modules)
    return settings


def training_settings(cfg: TuneConfig, preset, sections: dict[str, dict[str, Any]], device: str, dtype: str,
                      flash: bool, notes: list[str]) -> dict[str, Any]:
    train_cfg = dict(sections.get("TrainingArguments") or {})
    collator = sections.get("DataCollator") or {}
    # A padding-free batch is one flattened sequence; without FlashAttention's varlen kernels its
    # attention costs (batch × max_length)², so the CPU default is one packed row per step.
    default_length = 2048 if device == "cuda" else 512
    default_batch = (4 if flash else 2) if device == "cuda" else 1
    training: dict[str, Any] = {
        "per_device_train_batch_size": default_batch,
        "per_device_eval_batch_size": default_batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "num_train_epochs": 1.0,
        "max_steps": -1,
        "max_length": min(default_length, preset.context_length),
        "logging_steps": 1,
        "save_steps": 50,
        "seed": 42,
        "gradient_checkpointing": device == "cuda" and cfg.method == "qlora",
        "eval_strategy": "no",
        "optim": "adamw_torch",
    }
    for key, why in OWNED_KEYS.items():
        if key in train_cfg:
            notes.append(f"TrainingArguments.{key}={train_cfg.pop(key)!r} ignored: {why}")
    training["report_to"] = reporting_settings(train_cfg.pop("report_to", None), notes)
    training.update(train_cfg)
    flags = {
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.epochs,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "learning_rate": cfg.learning_rate,
        "save_steps": cfg.save_steps,
        "logging_steps": cfg.logging_steps,
        "seed": cfg.seed,
    }
    training.update({key: value for key, value in flags.items() if value is not None})
    if device == "cpu":
        for key in ("bf16", "fp16", "tf32"):
            if training.get(key):
                notes.append(f"TrainingArguments.{key} ignored on CPU: training runs in fp32")
        training.update(bf16=False, fp16=False, tf32=False, use_cpu=True)
    else:
        training.setdefault("bf16", dtype == "bfloat16")
        training.setdefault("fp16", dtype == "float16")
    if collator.get("mlm"):
        notes.append("DataCollator.mlm ignored: causal LM training (Kaito also falls back to mlm=false)")
    if "pad_to_multiple_of" in collator:
        training["pad_to_multiple_of"] = collator["pad_to_multiple_of"]
    for key in sorted(sections.get("DatasetConfig") or {}):
        notes.append(f"DatasetConfig.{key} is applied by fetch_dataset (--config), not here")
    # No compute goes to padding: best-fit-decreasing packing, padding-free batches (see steps.tune).
    training.setdefault("packing", True)
    training.setdefault("packing_strategy", "bfd")
    if training["packing"] is False:
        training.setdefault("padding_free", False)
    return training


def reporting_settings(requested: Any, notes: list[str]) -> list[str] | str:
    """``TrainingArguments.report_to``: the trackers this image can feed, each refusal noted.

    TensorBoard (tensorboardX writes the events; ``all`` includes it); MLflow when
    ``MLFLOW_TRACKING_URI`` is set and ``mlflow`` is installed; anything else is noted and dropped
    (a tracker that needs its own service or credentials would fail the step after the model loaded).
    """
    if requested in (None, "none", []):
        return "none"
    names = [requested] if isinstance(requested, str) else list(requested)
    if "all" in names:
        names = list(REPORTERS)
    chosen: list[str] = []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboardX") or importlib.util.find_spec("tensorboard"):
                chosen.append(name)
            else:
                notes.append("TrainingArguments.report_to tensorboard ignored: neither tensorboardX nor tensorboard is installed")
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                notes.append("TrainingArguments.report_to mlflow ignored: MLFLOW_TRACKING_URI is not set")
            elif importlib.util.find_spec("mlflow") is None:
                notes.append("TrainingArguments.report_to mlflow ignored: mlflow is not installed in this image "
                             "(pip install mlflow-skinny)")
            else:
                chosen.append(name)
        else:
            notes.append(f"TrainingArguments.report_to {name} ignored: kaiflow reports to {' and '.join(REPORTERS)} "
                         "(and always to loss.json, loss.png and kaiflow.json)")
    return chosen or "none"


def parallel_settings(training: dict[str, Any], ranks: Ranks, device: str,
                      notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(record, per-rank SFTConfig overrides): the plan's global batch divided among the ranks."""
    batch, accumulation, global_batch, note = split_batch(
        int(training["per_device_train_batch_size"]), int(training["gradient_accumulation_steps"]), ranks.world_size)
    if note:
        notes.append(note)
    record = {"processes": ranks.world_size, "global_batch": global_batch, "per_process_batch": batch,
              "per_process_gradient_accumulation_steps": accumulation}
    if not ranks.distributed:
        return record, {}
    per_rank: dict[str, Any] = {
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "ddp_backend": "nccl" if device == "cuda" else "gloo",
        # LoRA on a frozen base: every trainable parameter gets a gradient each step
        "ddp_find_unused_parameters": False,
    }
    if training.get("gradient_checkpointing"):
        per_rank["gradient_checkpointing_kwargs"] = {"use_reentrant": False, **(training.get("gradient_checkpointing_kwargs") or {})}
    return record, per_rank


# -- the library objects ------------------------------------------------------------------------


def build_bnb_config(settings: dict[str, Any] | None):
    if settings is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = dict(settings)
    if isinstance(kwargs.get("bnb_4bit_compute_dtype"), str):
        name = kwargs["bnb_4bit_compute_dtype"].removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise StepError(f"training_config.QuantizationConfig.bnb_4bit_compute_dtype: {name!r} is not a torch dtype")
        kwargs["bnb_4bit_compute_dtype"] = getattr(torch, name)
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StepError(f"training_config.QuantizationConfig: {exc}") from None


def build_lora_config(settings: dict[str, Any]):
    from peft import LoraConfig

    try:
        return LoraConfig(**settings)
    except (TypeError, ValueError, ImportError) as exc:  # ImportError: e.g. loftq without scipy
        raise StepError(f"training_config.LoraConfig: {exc}") from None


def build_sft_config(settings: dict[str, Any], output_dir: Path, chat: bool):
    from trl import SFTConfig

    try:
        return SFTConfig(output_dir=str(output_dir), assistant_only_loss=chat, **{**WORKFLOW_TRAINING, **settings})
    except (TypeError, ValueError) as exc:
        raise StepError(f"training_config.TrainingArguments: {exc}") from None
