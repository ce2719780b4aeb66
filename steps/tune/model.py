"""Loading what a plan names: the tokenizer (with a training chat template), the base model, the trainer.

Shared by the tune itself and by ``steps.tune.evaluate`` (the eval gate), so that an adapter is
scored with exactly the tokenisation, template, packing and precision it was trained with.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from presets.materialize import CHATML_TEMPLATE, resolve_model
from stepkit.common import StepError, report_progress
from steps.tune import attention
from steps.tune.chat import load_template_setting, training_template
from steps.tune.checkpoints import COMPLETE_MARKER
from steps.tune.head import use_compact_head
from steps.tune.parallel import Ranks, barrier
from steps.tune.plan import Plan

log = logging.getLogger("kaiflow.steps.tune")

TOKENIZER_KEYS = ("revision", "trust_remote_code", "local_files_only", "cache_dir")


def model_source(preset, plan: Plan) -> str:
    """Where the weights load from: the config's explicit source, else the preset's (materialised)."""
    if plan.source:
        return plan.source

    return resolve_model(preset)


def load_split(path: Path):
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pq.read_table(path)
    columns = [c for c in ("messages", "text") if c in table.column_names]
    if not columns:
        raise StepError(f"{path}: expected a 'messages' or 'text' column (from fetch_dataset), found {table.column_names}")
    return Dataset(table.select(columns[:1]))


def load_tokenizer(preset, plan: Plan, source: str, chat: bool):
    from transformers import AutoTokenizer


    kwargs = {k: v for k, v in plan.model_kwargs.items() if k in TOKENIZER_KEYS}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
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
    return tokenizer


def load_base_model(preset, plan: Plan, source: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {k: v for k, v in plan.model_kwargs.items() if k != "pretrained_model_name_or_path"}
    if kwargs.get("attn_implementation") == attention.NAME:
        attention.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, plan.dtype), quantization_config=plan.quantization, **kwargs
        )
    except OSError as exc:
        raise StepError(f"--preset {preset.name}: cannot load the model from {source}: {exc}") from None
    model.config.use_cache = False
    if plan.device == "cpu" and plan.quantization is not None:
        release_weights_file(model)
    return model


def release_weights_file(model) -> None:
    """Copy the tensors that still point into the mmapped safetensors file, so the mapping goes.

    A quantised load keeps the unquantised tensors (embeddings, norms) as views of the file's
    mapping; that alone keeps every page of the fp32 file that quantising read resident in this
    process (SmolLM2-135M: 420 MiB of a 540 MiB file, for 130 MiB of tensors).
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype != torch.uint8:  # the NF4 codes were created by bitsandbytes, not mapped
                tensor.data = tensor.data.clone()
    gc.collect()


def adapters_to_fp32_on_cpu(model, plan: Plan) -> None:
    # trl stores QLoRA adapters in bf16 (the paper's GPU recipe); on CPU that puts the adapter
    # matmuls and AdamW updates in bf16, which is both slower and lossier than fp32.
    if plan.quantization is None or plan.device != "cpu":
        return
    for name, param in model.named_parameters():
        if "lora_" in name or param.requires_grad:
            param.data = param.data.float()


def progress_callback(ranks=None):
    """Progress, checkpoint markers and one log line per logged step; files from rank 0 only."""
    from transformers import TrainerCallback


    ranks = ranks or Ranks()

    class Progress(TrainerCallback):
        eval_seconds = 0.0  # time in held-out evaluations, which throughput leaves out

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))
            if ranks.is_writer and metrics and "eval_loss" in metrics:
                log.info("step %d/%d held-out loss %.4f", state.global_step, state.max_steps, metrics["eval_loss"])

        def on_step_end(self, args, state, control, **kwargs):
            if ranks.is_writer:
                report_progress(state.global_step, state.max_steps)

        def on_save(self, args, state, control, **kwargs):
            # every rank has written its part (its RNG state) before the checkpoint is declared complete
            barrier(ranks)
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ranks.is_writer and checkpoint.is_dir():
                (checkpoint / COMPLETE_MARKER).write_text(f"{state.global_step}\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if ranks.is_writer and logs and "loss" in logs:
                extra = f" lr {logs['learning_rate']:.3g}" if isinstance(logs.get("learning_rate"), (int, float)) else ""
                log.info("step %d/%d loss %.4f%s", state.global_step, state.max_steps, logs["loss"], extra)

    return Progress()


def build_trainer(plan: Plan, model, tokenizer, train_ds, eval_ds, *, peft_config=None, callbacks=()):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    try:
        trainer = SFTTrainer(
            model=model,
            args=plan.training,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=list(callbacks),
        )
    except ValueError as exc:
        raise StepError(f"cannot set up training: {exc}") from None
    # one log line per logged step is the Progress callback's; the trainer's own would print the
    # same step again as a dict (PrinterCallback) or draw a tqdm bar into the log (ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    adapters_to_fp32_on_cpu(trainer.model, plan)
    if plan.device == "cpu":
        # trl's fused head scores every position off CUDA and recomputes the logits in the backward
        use_compact_head(trainer.model)
    return trainer
