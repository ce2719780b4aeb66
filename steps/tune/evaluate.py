"""Held-out loss of several adapters on the same rows, measured the way the tune measures it.

The eval gate needs the serving adapter and the candidate scored on the *same* held-out rows: the
loss recorded on the serving adapter's manifest was measured on the held-out split of the data
its own run fetched, and scheduled retuning exists because that data changed. Here one base model
is loaded (with the candidate's method: NF4 for qlora), every adapter is attached to it with
peft's ``load_adapter``, and each is evaluated in turn with ``set_adapter`` by the same trl trainer
the tune uses — same chat template, assistant-only loss, packing, ``max_length`` and precision —
so the numbers compare with each other and with the tune's own ``eval_loss``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from presets.catalog import UnknownPresetError, get_preset
from stepkit.common import StepError
from steps.tune.config import TuneConfig
from steps.tune.model import build_trainer, load_base_model, load_split, load_tokenizer, model_source
from steps.tune.plan import detect_device, empty_sections, make_plan

log = logging.getLogger("kaiflow.steps.tune")


def evaluate_adapters(preset_name: str, method: str, dataset_dir: Path, adapters: Mapping[str, Path], *,
                      base_model: str | None = None, training: Mapping[str, Any] | None = None,
                      device: str = "auto") -> dict[str, Any]:
    """``{"losses": {name: eval_loss}, "seconds": {...}}`` for each adapter on ``dataset_dir/eval.parquet``.

    ``training`` is the candidate's recorded training settings (``kaiflow.json``): its
    ``max_length`` and eval batch size are reused so the rows are packed as the tune packed them.
    ``base_model`` overrides the preset's weights, as ``ModelConfig.pretrained_model_name_or_path`` did.
    """

    if not adapters:
        raise ValueError("no adapters to evaluate")
    try:
        preset = get_preset(preset_name)
    except UnknownPresetError as exc:
        raise StepError(f"kaiflow.json preset: {exc}") from None
    eval_path = Path(dataset_dir) / "eval.parquet"
    if not eval_path.is_file():
        raise StepError(f"--dataset-dir {dataset_dir}: no eval.parquet (the fetch_dataset output the candidate trained on)")
    eval_ds = load_split(eval_path)
    if len(eval_ds) == 0:
        raise StepError(f"{eval_path}: no held-out rows to evaluate on")
    chat = "messages" in eval_ds.column_names
    training = training or {}

    started = time.perf_counter()
    sections = empty_sections()
    if base_model and base_model != preset.source:
        sections["ModelConfig"] = {"pretrained_model_name_or_path": base_model}
    with tempfile.TemporaryDirectory(prefix="kaiflow-eval-") as scratch:
        cfg = TuneConfig(preset=preset.name, method=method, dataset_dir=Path(dataset_dir), output_dir=Path(scratch),
                         checkpoint_dir=Path(scratch), max_length=training.get("max_length"),
                         batch_size=training.get("per_device_eval_batch_size"))
        plan = make_plan(cfg, preset, sections, detect_device(device), chat=chat, output_dir=Path(scratch))
        source = model_source(preset, plan)
        tokenizer = load_tokenizer(preset, plan, source, chat)
        model = _with_adapters(load_base_model(preset, plan, source), adapters)
        # trl insists on a training set; one row of the held-out split is never trained on here
        trainer = build_trainer(plan, model, tokenizer, eval_ds.select([0]), eval_ds)
        load_seconds = time.perf_counter() - started
        losses: dict[str, float] = {}
        seconds: dict[str, float] = {"load": round(load_seconds, 3)}
        for name in adapters:
            began = time.perf_counter()
            trainer.model.set_adapter(name)
            losses[name] = float(trainer.evaluate()["eval_loss"])
            seconds[name] = round(time.perf_counter() - began, 3)
            log.info("held-out loss of %s on %d rows of %s: %.6g (%.1f s)", name, len(eval_ds), eval_path,
                     losses[name], seconds[name])
    return {"losses": losses, "seconds": seconds, "rows": len(eval_ds)}


def _with_adapters(base, adapters: Mapping[str, Path]):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model
