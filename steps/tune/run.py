"""The tune itself: data in, trainer run (resuming), adapter folder out, atomically.

The adapter folder (``--output-dir``) is built as a hidden sibling, ``.<name>.partial-<pid>``, and
renamed into place only after the adapter, ``kaiflow.json``, ``loss.json`` and ``loss.png`` are all
written, so a run killed at any moment leaves either the previous complete folder or none: never
half an adapter that ``push_adapter`` would upload. Leftover partial siblings of a killed run are
removed on the next start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from presets.catalog import UnknownPresetError, get_preset
from presets.sizing import estimate_tuning
from stepkit.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    write_output,
)
from steps.tune.checkpoints import (
    RUN_FILE,
    check_run_record,
    checkpoint_step,
    complete_checkpoints,
    dataset_digest,
    run_identity,
    tokens_at,
)
from steps.tune.config import TuneConfig
from steps.tune.kaito_training_config import read_training_config
from steps.tune.logs import quiet_libraries
from steps.tune.model import (
    build_trainer,
    load_base_model,
    load_split,
    load_tokenizer,
    model_source,
    progress_callback,
)
from steps.tune.parallel import (
    Ranks,
    SampleCounter,
    barrier,
    count_training_samples,
    die_with_launcher,
    gather,
    in_worker,
    init_process_group,
    launch,
    processes_wanted,
    quiet_other_ranks,
    record_failure,
    shutdown,
)
from steps.tune.plan import TENSORBOARD_DIR, detect_device, empty_sections, make_plan
from steps.tune.report import write_reports

log = logging.getLogger("kaiflow.steps.tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m steps.tune",
        description="LoRA / QLoRA fine-tuning with trl's SFTTrainer that resumes, measures and reports.",
    )
    add_dataclass_arguments(parser, TuneConfig)
    add_common_arguments(parser)
    return parser


def check_inputs(cfg: TuneConfig):
    """The preset, checked; StepError names the flag that is wrong."""

    try:
        preset = get_preset(cfg.preset)
    except UnknownPresetError as exc:
        raise StepError(f"--preset: {exc}") from None
    if not preset.tuning:
        raise StepError(f"--preset {cfg.preset}: this preset does not support tuning")
    if cfg.method not in ("lora", "qlora"):
        raise StepError(f"--method must be lora or qlora, got {cfg.method!r}")
    if not (cfg.dataset_dir / "train.parquet").is_file():
        raise StepError(f"--dataset-dir {cfg.dataset_dir}: no train.parquet (run fetch_dataset first)")
    return preset


def read_sections(cfg: TuneConfig) -> dict[str, dict[str, Any]]:
    if not cfg.config:
        return empty_sections()

    return read_training_config(cfg.config)


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def partial_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"


def remove_stale_partials(output_dir: Path) -> None:
    for stale in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        log.warning("removing %s, left by a tune that was stopped while writing its adapter", stale)
        shutil.rmtree(stale, ignore_errors=True)


def publish(staging: Path, output_dir: Path) -> None:
    """Put the finished folder at ``output_dir``, replacing an older one; never a mix of both."""
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if output_dir.exists():
        output_dir.rename(old)
    staging.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def tune(cfg: TuneConfig, ranks: Ranks = Ranks()) -> dict[str, Any]:
    """Train and write the adapter folder; with ``ranks``, this process's share of a data-parallel run.

    Every rank runs this; only rank 0 (``ranks.is_writer``) writes the run record, the adapter
    folder and the reports, and removes what a killed run left. The info dict is rank 0's.
    """
    preset = check_inputs(cfg)
    sections = read_sections(cfg)


    repeats = quiet_libraries()
    train_path, eval_path = cfg.dataset_dir / "train.parquet", cfg.dataset_dir / "eval.parquet"
    train_ds = load_split(train_path)
    eval_ds = load_split(eval_path) if eval_path.is_file() else None
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    if len(train_ds) == 0:
        raise StepError(f"{train_path}: no training rows")
    chat = "messages" in train_ds.column_names

    import torch

    device = detect_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if ranks.distributed and device == "cuda" and ranks.local_rank >= torch.cuda.device_count():
        raise StepError(f"--nproc {ranks.world_size}: rank {ranks.rank} has no GPU "
                        f"(local rank {ranks.local_rank}, {torch.cuda.device_count()} visible)")
    plan = make_plan(cfg, preset, sections, device, chat=chat, ranks=ranks)
    if ranks.is_writer:
        for note in plan.notes:
            log.warning("config: %s", note)
    init_process_group(ranks, device)

    digest = dataset_digest(cfg)
    if ranks.is_writer:
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        cfg.output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(cfg.output_dir)
        checkpoints = complete_checkpoints(cfg.checkpoint_dir)
        record = check_run_record(cfg.checkpoint_dir, run_identity(cfg, plan, digest), bool(checkpoints))
    # the other ranks read what rank 0 decided: the same checkpoint, the same record
    barrier(ranks)
    if not ranks.is_writer:
        checkpoints = complete_checkpoints(cfg.checkpoint_dir, remove_incomplete=False)
        record = json.loads((cfg.checkpoint_dir / RUN_FILE).read_text())
    resume_from = checkpoints[-1] if checkpoints else None


    estimate = estimate_tuning(
        preset,
        cfg.method,
        batch_size=int(plan.training.per_device_train_batch_size),
        seq_len=int(plan.training.max_length),
        lora_r=int(plan.lora.r),
        gradient_checkpointing=bool(plan.training.gradient_checkpointing),
        device=device,
        lora_dropout=float(plan.lora.lora_dropout or 0.0),
    )
    if ranks.is_writer:
        log.info("plan: %s", describe_step(plan))
        log.info("memory estimate per process (presets.sizing, %s): %s",
                 "peak RSS of this CPU process" if device == "cpu" else "one GPU", estimate.describe())
        parallel = plan.record["parallel"]
        log.info("batch: %d packed sequences per optimizer step = %d processes × %d per process × %d accumulation",
                 parallel["global_batch"], parallel["processes"], parallel["per_process_batch"],
                 parallel["per_process_gradient_accumulation_steps"])

    tensorboard = None
    if "tensorboard" in (plan.training.report_to or []):
        # one folder across retries (a resumed run appends), copied into the adapter folder at the end
        tensorboard = cfg.checkpoint_dir / TENSORBOARD_DIR
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard)
    source = model_source(preset, plan)
    tokenizer = load_tokenizer(preset, plan, source, chat)
    model = load_base_model(preset, plan, source)
    progress = progress_callback(ranks)
    trainer = build_trainer(plan, model, tokenizer, train_ds, eval_ds, peft_config=plan.lora, callbacks=[progress])
    counter = SampleCounter()
    count_training_samples(trainer, counter)

    # The held-out loss before training is measured by the trainer at the start of train()
    # (eval_on_start), not by an evaluate() call before it: an evaluate() before train() marks the
    # model as prepared, and the trainer then skips wrapping it in DDP, so the ranks would train
    # apart without a word (transformers 5.24 + accelerate 1.15).
    at_start = eval_ds is not None and resume_from is None and not cfg.skip_initial_eval
    schedule_evaluation(trainer, plan, cfg.eval_points, at_start=at_start)
    if resume_from and ranks.is_writer:
        log.info("resuming from %s", resume_from)

    # read now: checkpoint rotation may delete the resumed checkpoint during training
    tokens_before = tokens_at(resume_from) if resume_from else 0
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # throughput counts training only, not the held-out evaluations made during train()
    train_seconds = time.perf_counter() - started - progress.eval_seconds
    tokens = trainer.state.num_input_tokens_seen - tokens_before  # all ranks' tokens (the trainer sums them)

    if eval_ds is None:
        eval_loss = math.nan
    elif (last := last_eval(trainer.state.log_history)) and last["step"] == trainer.state.global_step:
        eval_loss = float(last["eval_loss"])
    else:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    initial = next((e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0), None)
    if initial is not None:
        record["eval_loss_initial"] = float(initial["eval_loss"])
    peak = peak_memory_bytes(device)

    rank_summary = dict(counter.summary(ranks.rank), peak_memory_bytes=peak,
                        adapter_checksum=trainable_checksum(trainer.model))
    log.info("rank %d of %d trained on %d examples (%d tokens) in this run",
             ranks.rank, ranks.world_size, counter.examples, counter.tokens)
    per_rank = gather(ranks, rank_summary)
    # which examples each rank saw, to show the shards cover the dataset (skipped for large runs)
    fingerprints = gather(ranks, counter.fingerprints if counter.examples <= 200_000 else None)
    if not ranks.is_writer:
        return {}

    history = trainer.state.log_history
    losses = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "epoch": e.get("epoch")}
              for e in history if "loss" in e]
    metrics = {
        "train_loss": losses[-1]["loss"] if losses else math.nan,
        "train_loss_first": losses[0]["loss"] if losses else math.nan,
        "eval_loss": eval_loss,
        "eval_loss_initial": record.get("eval_loss_initial", math.nan),
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else math.nan,
        "tokens": int(tokens),
        "train_seconds": round(train_seconds, 3),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank),
        "peak_memory_kind": "cuda_max_allocated" if device == "cuda" else "process_max_rss",  # the largest rank's
        "steps": int(trainer.state.global_step),
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
        "processes": ranks.world_size,
        # what each rank trained on in this run (after a resume: since the checkpoint)
        "ranks": per_rank,
        "examples": sum(r["examples"] for r in per_rank),
        # DDP keeps the replicas equal: the same adapter on every rank, or the run was not data parallel
        "replicas_identical": len({r["adapter_checksum"] for r in per_rank}) == 1,
        "examples_distinct": (len({f for shard in fingerprints for f in shard})
                              if all(shard is not None for shard in fingerprints) else None),
        "memory_estimate": {"total_bytes": estimate.total_bytes, "total_gib": round(estimate.total_gib, 3),
                            "parts": estimate.parts, "settings": estimate.settings, "per": "process"},
    }
    log.info(
        "peak memory measured: %.2f GiB (%s); estimated: %.2f GiB",
        metrics["peak_memory_bytes"] / 1024**3, metrics["peak_memory_kind"], estimate.total_gib,
    )
    info = {
        "base_model": plan.source or preset.source,
        "preset": preset.name,
        "method": cfg.method,
        "dataset_digest": digest,
        "device": device,
        "dtype": plan.dtype,
        "data_kind": "chat" if chat else "text",
        "assistant_only_loss": chat,
        **plan.record,
        "config_notes": plan.notes,
        "metrics": metrics,
    }
    write_adapter_folder(cfg.output_dir, trainer.model, losses, [e for e in history if "eval_loss" in e], info,
                         tensorboard=tensorboard)
    if repeats.repeats:
        log.info("library warnings: %d repeats of %d distinct ones not shown again", repeats.repeats, len(repeats.seen))
    return info


def describe_step(plan) -> str:
    """One line: what a training step carries and keeps (the inputs of the memory estimate)."""
    args = plan.training
    rows = int(args.per_device_train_batch_size)
    # trl flattens bfd-packed batches into one padding-free row (SFTTrainer.padding_free)
    padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if args.packing:
        shape = (f"{rows} packed row{'s' if rows > 1 else ''} × {args.max_length} tokens "
                 f"({args.packing_strategy}{', padding-free' if padding_free else ''})")
    else:
        shape = f"{rows} row{'s' if rows > 1 else ''} of up to {args.max_length} tokens, padded, no packing"
    return (f"batch {shape} per step × {args.gradient_accumulation_steps} accumulation; "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
            f"attention {plan.model_kwargs.get('attn_implementation')}; LoRA r={plan.lora.r} "
            f"dropout {plan.lora.lora_dropout}; {plan.dtype} compute on {plan.device}")


def last_eval(history: list[dict]) -> dict | None:
    return next((e for e in reversed(history) if "eval_loss" in e), None)


def schedule_evaluation(trainer, plan, points: int, *, at_start: bool) -> None:
    """Held-out loss about ``points`` times a run (and at the start); the user's eval_strategy wins."""
    if trainer.eval_dataset is None:
        return
    args = trainer.args
    args.eval_on_start = at_start
    if plan.record["training"].get("eval_strategy", "no") != "no" or points <= 0:
        return
    from transformers.trainer_utils import IntervalStrategy

    total = total_steps(trainer)
    args.eval_strategy = IntervalStrategy.STEPS
    args.eval_steps = max(1, math.ceil(total / points))


def total_steps(trainer) -> int:
    """The optimizer steps train() will take (max_steps, else epochs over the sharded dataloader)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(1, math.ceil(batches / max(1, args.gradient_accumulation_steps)))
    return max(1, math.ceil(args.num_train_epochs * per_epoch))


def trainable_checksum(model) -> str:
    """A digest of the trainable weights (the adapter), to check that every rank holds the same."""
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            h.update(name.encode())
            h.update(param.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_adapter_folder(output_dir: Path, model, losses: list[dict], evals: list[dict], info: dict[str, Any], *,
                         tensorboard: Path | None = None) -> None:
    staging = partial_dir(output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        if tensorboard is not None and tensorboard.is_dir():
            shutil.copytree(tensorboard, staging / TENSORBOARD_DIR)
        write_reports(staging, losses, evals, info["metrics"])
        (staging / "kaiflow.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(TuneConfig, args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.nproc is not None and cfg.nproc < 1:
        raise StepError(f"--nproc must be at least 1, got {cfg.nproc}")
    if not in_worker():
        processes = processes_wanted(cfg.nproc, detect_device(cfg.device))
        if processes > 1:
            return launch(argv, processes, detect_device(cfg.device))
    die_with_launcher()
    ranks = Ranks.from_env()
    quiet_other_ranks(ranks)
    try:
        info = tune(cfg, ranks)
    except StepError as exc:
        record_failure(f"error: {exc}")
        raise
    except BaseException as exc:
        record_failure(f"error: unexpected {type(exc).__name__}: {exc}")
        raise
    finally:
        shutdown(ranks)
    if not ranks.is_writer:
        return 0
    metrics = info["metrics"]
    write_output(args.outputs, "train-loss", f"{metrics['train_loss']:.6f}")
    write_output(args.outputs, "eval-loss", f"{metrics['eval_loss']:.6f}")
    write_output(args.outputs, "tokens-per-second", f"{metrics['tokens_per_s']:.3f}")
    log.info(
        "adapter written to %s: train loss %.4f, held-out loss %.4f (was %.4f), %.1f tokens/s, %d steps",
        cfg.output_dir, metrics["train_loss"], metrics["eval_loss"], metrics["eval_loss_initial"],
        metrics["tokens_per_s"], metrics["steps"],
    )
    return 0
