"""Step: LoRA / QLoRA fine-tuning with trl's SFTTrainer that resumes, measures and reports.

``python -m steps.tune --preset NAME --method {lora,qlora} --dataset-dir DIR --output-dir DIR
--checkpoint-dir DIR [--config training_config.yaml] [--dataset-digest D] [--max-steps N]``

Settings are layered, later wins: preset and device defaults → Kaito's ``training_config.yaml``
(``steps.tune_config`` checks every key) → command-line flags → what the workflow must own
(paths, checkpointing, reporting). Device-aware defaults:

* CPU: fp32 weights and fp32 compute everywhere — bf16 matmuls have no fast path on most CPUs
  (NF4 with bf16 compute measured 45 s/step against 5 s/step in fp32) — and no gradient
  checkpointing, which only trades compute for memory a CPU host rarely lacks.
* CUDA: bf16 where the GPU supports it (else fp16), gradient checkpointing on for QLoRA.
* ``qlora``: NF4 base with double quantisation (bitsandbytes); ``lora``: a full-precision base.

No compute goes to padding: rows are packed best-fit-decreasing into ``max_length`` blocks and a
batch is flattened into one sequence with ``position_ids`` restarting per example (trl's
``packing_strategy="bfd"``, padding-free). transformers turns those position ids into a
block-diagonal mask for SDPA, so packed examples never attend to each other — on CPU too, no
FlashAttention needed. Chat rows train on assistant tokens only (``steps.tune_chat`` supplies a
template with ``{% generation %}`` markers where the model's own lacks them).

Resume: checkpoints go to ``--checkpoint-dir`` every ``save_steps``. A checkpoint counts only once
a marker file is written after the trainer's save returned, so a kill during a save leaves a
directory that is ignored (and removed) on the next start. A rerun with the same arguments
continues from the newest complete checkpoint, with optimizer, scheduler, RNG and data order
restored by the trainer. ``kaiflow-run.json`` in the checkpoint dir records what the run was
(preset, method, dataset digest, settings); a rerun that differs is refused rather than mixing
two trainings — except ``--max-steps``, which may grow to train further.

Reports: the memory estimate from ``presets.sizing`` before training and the measured peak after
(RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), ``done/total`` steps to
``ARGO_PROGRESS_FILE``, held-out loss before and after, tokens/s (real tokens only: there is no
padding), ``loss.json`` and ``loss.png``, and ``kaiflow.json`` beside the PEFT adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    report_progress,
    run_step,
    write_output,
)

log = logging.getLogger("kaiflow.steps.tune")

RUN_FILE = "kaiflow-run.json"
COMPLETE_MARKER = "kaiflow-complete"
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}
# TrainingArguments keys the workflow owns: a config that sets them is told they are ignored.
OWNED_KEYS = {
    "output_dir": "checkpoints go to --checkpoint-dir; the adapter to --output-dir",
    "overwrite_output_dir": "the checkpoint dir is managed by kaiflow",
    "save_strategy": "kaiflow checkpoints every save_steps so a retried step resumes (Kaito's 'epoch'/'no' loses work)",
    "resume_from_checkpoint": "kaiflow resumes from the newest complete checkpoint by itself",
    "report_to": "metrics go to loss.json and kaiflow.json",
    "push_to_hub": "the adapter is pushed by the push_adapter step",
    "hub_model_id": "the adapter is pushed by the push_adapter step",
    "hub_token": "the adapter is pushed by the push_adapter step",
}


@dataclass
class TuneConfig:
    preset: str = field(metadata={"help": "model preset name (presets/models.yaml)"})
    method: str = field(metadata={"help": "lora (full-precision base) or qlora (4-bit NF4 base)", "choices": ["lora", "qlora"]})
    dataset_dir: Path = field(metadata={"help": "folder with train.parquet and eval.parquet from fetch_dataset"})
    output_dir: Path = field(metadata={"help": "where the adapter, kaiflow.json, loss.json and loss.png are written"})
    checkpoint_dir: Path = field(metadata={"help": "where checkpoints go; a rerun resumes from the newest"})
    config: Path | None = field(default=None, metadata={"help": "Kaito training_config.yaml (or a ConfigMap manifest holding it)"})
    dataset_digest: str | None = field(default=None, metadata={"help": "digest of the dataset (default: summary.json's)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps (default: epochs)"})
    skip_initial_eval: bool = field(default=False, metadata={"help": "do not measure the held-out loss before training"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training set when --max-steps is not set (default 1)"})
    batch_size: int | None = field(default=None, metadata={"help": "packed sequences per step per device (default 1 on CPU, 2 on CUDA)"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per packed sequence (default 512 on CPU, 2048 on CUDA)"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default 2e-4)"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps (default 50)"})
    logging_steps: int | None = field(default=None, metadata={"help": "log the training loss every N steps (default 1)"})
    seed: int | None = field(default=None, metadata={"help": "random seed (default 42)"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: all cores)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": ["auto", "cpu", "cuda"]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.tune", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, TuneConfig)
    add_common_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class Plan:
    """Everything the run will use, resolved; recorded in kaiflow.json."""

    device: str
    dtype: str
    model_kwargs: dict[str, Any]
    quantization: dict[str, Any] | None
    lora: dict[str, Any]
    training: dict[str, Any]
    chat_template: str | None
    notes: list[str]


def detect_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise StepError("--device cuda: no CUDA device is visible")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def make_plan(cfg: TuneConfig, preset, sections: dict[str, dict[str, Any]], device: str) -> Plan:
    import torch

    notes: list[str] = []
    model_cfg = dict(sections["ModelConfig"])
    quant_cfg = dict(sections["QuantizationConfig"])
    train_cfg = dict(sections["TrainingArguments"])

    if device == "cuda":
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "float32"
    requested_dtype = model_cfg.pop("torch_dtype", None)
    if requested_dtype and device == "cpu" and requested_dtype != "float32":
        notes.append(f"ModelConfig.torch_dtype={requested_dtype} ignored on CPU: fp32 is several times faster there")
    elif requested_dtype and requested_dtype != "auto":
        dtype = requested_dtype

    flash = device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model_kwargs: dict[str, Any] = {"attn_implementation": "flash_attention_2" if flash else "sdpa"}
    for key in ("revision", "trust_remote_code", "attn_implementation", "local_files_only", "cache_dir"):
        if key in model_cfg:
            model_kwargs[key] = model_cfg.pop(key)
    model_kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
    if "device_map" in model_cfg:
        notes.append("ModelConfig.device_map ignored: one device per tuning pod")
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

    quantization = None
    if cfg.method == "qlora":
        if quant_cfg.get("load_in_4bit") is False or quant_cfg.get("load_in_8bit"):
            raise StepError("training_config.QuantizationConfig: method qlora needs load_in_4bit: true (and no load_in_8bit)")
        quant_method = quant_cfg.pop("quant_method", "bitsandbytes")
        if quant_method != "bitsandbytes":
            raise StepError(f"training_config.QuantizationConfig.quant_method: {quant_method!r} is not supported (bitsandbytes)")
        quantization = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
        }
        quantization.update(quant_cfg)
        if device == "cpu" and quantization["bnb_4bit_compute_dtype"] != "float32":
            notes.append(
                f"QuantizationConfig.bnb_4bit_compute_dtype={quantization['bnb_4bit_compute_dtype']} ignored on CPU: "
                "bf16 NF4 compute is ~9x slower there than fp32"
            )
            quantization["bnb_4bit_compute_dtype"] = "float32"
    elif quant_cfg.get("load_in_4bit") or quant_cfg.get("load_in_8bit"):
        raise StepError("training_config.QuantizationConfig: load_in_4bit/load_in_8bit contradict method lora (use method qlora)")

    lora = dict(DEFAULT_LORA, target_modules=list(preset.lora_target_modules))
    lora.update(sections["LoraConfig"])
    if not lora.get("target_modules"):
        lora["target_modules"] = list(preset.lora_target_modules)

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
            value = train_cfg.pop(key)
            notes.append(f"TrainingArguments.{key}={value!r} ignored: {why}")
    training.update(train_cfg)
    for key, value in {
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.epochs,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "learning_rate": cfg.learning_rate,
        "save_steps": cfg.save_steps,
        "logging_steps": cfg.logging_steps,
        "seed": cfg.seed,
    }.items():
        if value is not None:
            training[key] = value
    if device == "cpu":
        for key in ("bf16", "fp16", "tf32"):
            if training.get(key):
                notes.append(f"TrainingArguments.{key} ignored on CPU: training runs in fp32")
        training.update(bf16=False, fp16=False, tf32=False, use_cpu=True)
    else:
        training.setdefault("bf16", dtype == "bfloat16")
        training.setdefault("fp16", dtype == "float16")
    if sections["DataCollator"].get("mlm"):
        notes.append("DataCollator.mlm ignored: causal LM training (Kaito also falls back to mlm=false)")
    if "pad_to_multiple_of" in sections["DataCollator"]:
        training["pad_to_multiple_of"] = sections["DataCollator"]["pad_to_multiple_of"]
    for key in sorted(sections["DatasetConfig"]):
        notes.append(f"DatasetConfig.{key} ignored: fetch_dataset already normalised and split the data")
    training.setdefault("packing", True)
    training.setdefault("packing_strategy", "bfd")
    if training["packing"] is False:
        training.setdefault("padding_free", False)
    return Plan(device, dtype, model_kwargs, quantization, lora, training, template, notes)


# ---------------------------------------------------------------------------------------------
# Checkpoints and the run record


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    found = []
    for path in checkpoint_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            if (path / COMPLETE_MARKER).exists():
                found.append(path)
            else:
                log.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", path)
                shutil.rmtree(path, ignore_errors=True)
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def run_identity(cfg: TuneConfig, plan: Plan, digest: str) -> dict[str, Any]:
    training = {k: v for k, v in plan.training.items() if k not in ("max_steps", "save_steps", "logging_steps")}
    settings = {"lora": plan.lora, "quantization": plan.quantization, "training": training, "dtype": plan.dtype}
    return {
        "preset": cfg.preset,
        "method": cfg.method,
        "dataset_digest": digest,
        "settings_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
    }


def check_run_record(checkpoint_dir: Path, identity: dict[str, Any], has_checkpoints: bool) -> dict[str, Any]:
    path = checkpoint_dir / RUN_FILE
    if path.exists():
        record = json.loads(path.read_text())
        if has_checkpoints:
            for key, value in identity.items():
                if record.get("identity", {}).get(key) != value:
                    raise StepError(
                        f"--checkpoint-dir {checkpoint_dir} holds checkpoints of another run ({key} differs: "
                        f"{record.get('identity', {}).get(key)!r} there, {value!r} now); use a fresh directory"
                    )
            return record
    record = {"identity": identity}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def dataset_digest(cfg: TuneConfig) -> str:
    if cfg.dataset_digest:
        return cfg.dataset_digest
    summary = cfg.dataset_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["digest"]
    h = hashlib.sha256()
    for name in ("train.parquet", "eval.parquet"):
        if (cfg.dataset_dir / name).exists():
            h.update((cfg.dataset_dir / name).read_bytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------


def load_split(path: Path):
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pq.read_table(path)
    columns = [c for c in ("messages", "text") if c in table.column_names]
    if not columns:
        raise StepError(f"{path}: expected a 'messages' or 'text' column (from fetch_dataset), found {table.column_names}")
    return Dataset(table.select(columns[:1]))


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def tune(cfg: TuneConfig) -> dict[str, Any]:
    from presets.catalog import UnknownPresetError, get_preset

    try:
        preset = get_preset(cfg.preset)
    except UnknownPresetError as exc:
        raise StepError(f"--preset: {exc}") from None
    if not preset.tuning:
        raise StepError(f"--preset {cfg.preset}: this preset does not support tuning")
    if cfg.method not in ("lora", "qlora"):
        raise StepError(f"--method must be lora or qlora, got {cfg.method!r}")
    train_path, eval_path = cfg.dataset_dir / "train.parquet", cfg.dataset_dir / "eval.parquet"
    if not train_path.is_file():
        raise StepError(f"--dataset-dir {cfg.dataset_dir}: no train.parquet (run fetch_dataset first)")
    sections = {name: {} for name in ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator", "DatasetConfig")}
    if cfg.config:
        from steps.tune_config import read_training_config

        sections = read_training_config(cfg.config)

    import torch

    device = detect_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = make_plan(cfg, preset, sections, device)
    for note in plan.notes:
        log.warning("config: %s", note)

    train_ds = load_split(train_path)
    eval_ds = load_split(eval_path) if eval_path.is_file() else None
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    if len(train_ds) == 0:
        raise StepError(f"{train_path}: no training rows")
    chat = "messages" in train_ds.column_names

    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    digest = dataset_digest(cfg)
    checkpoints = complete_checkpoints(cfg.checkpoint_dir)
    identity = run_identity(cfg, plan, digest)
    record = check_run_record(cfg.checkpoint_dir, identity, bool(checkpoints))
    resume_from = checkpoints[-1] if checkpoints else None

    from presets.sizing import estimate_tuning

    estimate = estimate_tuning(
        preset,
        cfg.method,
        batch_size=int(plan.training["per_device_train_batch_size"]),
        seq_len=int(plan.training["max_length"]),
        lora_r=int(plan.lora["r"]),
        gradient_checkpointing=bool(plan.training["gradient_checkpointing"]),
    )
    log.info("memory estimate (GPU sizing, presets.sizing): %s", estimate.describe())

    trainer, tokenizer = build_trainer(cfg, preset, plan, train_ds, eval_ds, chat)

    if eval_ds is not None and "eval_loss_initial" not in record and not cfg.skip_initial_eval:
        record["eval_loss_initial"] = float(trainer.evaluate()["eval_loss"])
        (cfg.checkpoint_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        log.info("held-out loss before training: %.4f", record["eval_loss_initial"])
    if resume_from:
        log.info("resuming from %s", resume_from)

    # read now: checkpoint rotation may delete the resumed checkpoint during training
    tokens_before = _tokens_at(resume_from) if resume_from else 0
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen - tokens_before

    eval_loss = float(trainer.evaluate()["eval_loss"]) if eval_ds is not None else math.nan
    peak = peak_memory_bytes(device)

    trainer.model.save_pretrained(cfg.output_dir)
    history = trainer.state.log_history
    losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "epoch": e.get("epoch")} for e in history if "loss" in e]
    train_loss = losses[-1]["loss"] if losses else math.nan
    metrics = {
        "train_loss": train_loss,
        "train_loss_first": losses[0]["loss"] if losses else math.nan,
        "eval_loss": eval_loss,
        "eval_loss_initial": record.get("eval_loss_initial", math.nan),
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else math.nan,
        "tokens": int(tokens),
        "train_seconds": round(train_seconds, 3),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_max_allocated" if device == "cuda" else "process_max_rss",
        "steps": int(trainer.state.global_step),
        "resumed_from_step": int(resume_from.name.removeprefix("checkpoint-")) if resume_from else None,
        "memory_estimate": {"total_bytes": estimate.total_bytes, "total_gib": round(estimate.total_gib, 3), "parts": estimate.parts, "settings": estimate.settings},
    }
    log.info(
        "peak memory measured: %.2f GiB (%s); estimate for a GPU: %.2f GiB",
        peak / 1024**3, metrics["peak_memory_kind"], estimate.total_gib,
    )
    from steps.tune_report import write_reports

    write_reports(cfg.output_dir, losses, [e for e in history if "eval_loss" in e], metrics)
    info = {
        "base_model": _source_of(preset, plan),
        "preset": preset.name,
        "method": cfg.method,
        "dataset_digest": digest,
        "device": device,
        "dtype": plan.dtype,
        "data_kind": "chat" if chat else "text",
        "assistant_only_loss": chat,
        "lora": {k: v for k, v in plan.lora.items()},
        "quantization": plan.quantization,
        "training": {k: v for k, v in plan.training.items()},
        "config_notes": plan.notes,
        "metrics": metrics,
    }
    (cfg.output_dir / "kaiflow.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


def _tokens_at(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def _source_of(preset, plan: Plan) -> str:
    return plan.model_kwargs.get("pretrained_model_name_or_path") or preset.source


def build_trainer(cfg: TuneConfig, preset, plan: Plan, train_ds, eval_ds, chat: bool):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from presets.materialize import CHATML_TEMPLATE, resolve_model
    from steps.tune_chat import load_template_setting, training_template

    model_kwargs = dict(plan.model_kwargs)
    source = model_kwargs.pop("pretrained_model_name_or_path", None) or resolve_model(preset)
    tokenizer_kwargs = {k: v for k, v in model_kwargs.items() if k in ("revision", "trust_remote_code", "local_files_only", "cache_dir")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except OSError as exc:  # not in the local cache / model volume, no network, gated without a token
        raise StepError(f"--preset {preset.name}: cannot load the tokenizer from {source}: {exc}") from None
    if plan.chat_template:
        tokenizer.chat_template = load_template_setting(plan.chat_template)
    elif tokenizer.chat_template is None and preset.chat_template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    if chat:
        tokenizer.chat_template = training_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    quantization = None
    if plan.quantization:
        q = dict(plan.quantization)
        if isinstance(q.get("bnb_4bit_compute_dtype"), str):
            q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
        try:
            quantization = BitsAndBytesConfig(**q)
        except (TypeError, ValueError) as exc:
            raise StepError(f"training_config.QuantizationConfig: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, plan.dtype), quantization_config=quantization, **model_kwargs
        )
    except OSError as exc:
        raise StepError(f"--preset {preset.name}: cannot load the model from {source}: {exc}") from None
    model.config.use_cache = False

    try:
        peft_config = LoraConfig(**plan.lora)
    except (TypeError, ValueError) as exc:
        raise StepError(f"training_config.LoraConfig: {exc}") from None
    try:
        args = SFTConfig(
            output_dir=str(cfg.checkpoint_dir),
            save_strategy="steps",
            save_total_limit=2,
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="all",  # padding-free batches hold no padding to exclude
            assistant_only_loss=chat,
            dataset_num_proc=None,
            **plan.training,
        )
    except (TypeError, ValueError) as exc:
        raise StepError(f"training_config.TrainingArguments: {exc}") from None

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report_progress(state.global_step, state.max_steps)

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / COMPLETE_MARKER).write_text(f"{state.global_step}\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.info("step %d/%d loss %.4f", state.global_step, state.max_steps, logs["loss"])

    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Progress()],
        )
    except ValueError as exc:
        raise StepError(f"cannot set up training: {exc}") from None
    if plan.quantization and plan.device == "cpu":
        # trl stores QLoRA adapters in bf16 (the paper's GPU recipe); on CPU that puts the adapter
        # matmuls and AdamW updates in bf16, which is both slower and lossier than fp32.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(TuneConfig, args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = tune(cfg)
    metrics = info["metrics"]
    write_output(args.outputs, "train-loss", f"{metrics['train_loss']:.6f}")
    write_output(args.outputs, "eval-loss", f"{metrics['eval_loss']:.6f}")
    log.info(
        "adapter written to %s: train loss %.4f, held-out loss %.4f (was %.4f), %.1f tokens/s, %d steps",
        cfg.output_dir, metrics["train_loss"], metrics["eval_loss"], metrics["eval_loss_initial"],
        metrics["tokens_per_s"], metrics["steps"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
