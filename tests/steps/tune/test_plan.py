"""steps.tune.plan: the settings layers and the peft/trl/bitsandbytes objects they end as (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from presets.catalog import get_preset
from stepkit.common import StepError
from steps.tune import TuneConfig, make_plan
from steps.tune.plan import empty_sections, training_settings

TINY = get_preset("kaiflow-tiny-test")


def config(method: str = "lora", **flags) -> TuneConfig:
    return TuneConfig(preset=TINY.name, method=method, dataset_dir=Path("data"), output_dir=Path("adapter"),
                      checkpoint_dir=Path("ckpt"), **flags)


def sections(**given) -> dict:
    return {**empty_sections(), **given}


def test_cpu_lora_plan_builds_the_library_objects():
    from peft import LoraConfig
    from trl import SFTConfig

    plan = make_plan(config(max_steps=3, max_length=128), TINY, empty_sections(), "cpu")
    assert isinstance(plan.lora, LoraConfig) and isinstance(plan.training, SFTConfig) and plan.quantization is None
    assert plan.lora.r == 8 and plan.lora.lora_alpha == 16 and set(plan.lora.target_modules) == set(TINY.lora_target_modules)
    args = plan.training
    # trl defaults bf16=True and gradient checkpointing on: both off on CPU
    assert (args.bf16, args.fp16, args.use_cpu, args.gradient_checkpointing) == (False, False, True, False)
    assert (args.packing, args.packing_strategy, args.max_length, args.max_steps) == (True, "bfd", 128, 3)
    assert args.assistant_only_loss is True and args.output_dir == "ckpt" and args.save_strategy == "steps"
    assert plan.dtype == "float32" and plan.model_kwargs["device_map"] == "cpu"
    # the record holds the choices, not the libraries' defaults
    assert plan.record["training"]["max_length"] == 128 and "save_total_limit" not in plan.record["training"]
    assert plan.record["quantization"] is None and plan.record["lora"]["r"] == 8


def test_text_rows_train_on_every_token():
    plan = make_plan(config(), TINY, empty_sections(), "cpu", chat=False)
    assert plan.training.assistant_only_loss is False


def test_kaito_qlora_settings_on_cpu_become_fp32_nf4_and_say_so():
    import torch
    from transformers import BitsAndBytesConfig

    given = sections(
        ModelConfig={"torch_dtype": "bfloat16", "device_map": "auto"},
        QuantizationConfig={"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"},
        LoraConfig={"r": 4, "lora_alpha": 8},
        TrainingArguments={"bf16": True, "output_dir": "/mnt/results", "save_total_limit": 5},
    )
    plan = make_plan(config("qlora"), TINY, given, "cpu")
    assert isinstance(plan.quantization, BitsAndBytesConfig)
    assert plan.quantization.bnb_4bit_quant_type == "nf4" and plan.quantization.bnb_4bit_use_double_quant
    assert plan.quantization.bnb_4bit_compute_dtype == torch.float32
    assert plan.record["quantization"]["bnb_4bit_compute_dtype"] == "float32"
    assert (plan.lora.r, plan.lora.lora_alpha) == (4, 8)
    assert plan.training.bf16 is False and plan.training.output_dir == "ckpt" and plan.training.save_total_limit == 5
    notes = "\n".join(plan.notes)
    for expected in ("torch_dtype=bfloat16 ignored on CPU", "bnb_4bit_compute_dtype=bfloat16 ignored on CPU",
                     "TrainingArguments.bf16 ignored on CPU", "output_dir='/mnt/results' ignored",
                     "device_map ignored"):
        assert expected in notes


def test_cuda_defaults_layer():
    notes: list[str] = []
    qlora = training_settings(config("qlora"), TINY, empty_sections(), "cuda", "bfloat16", False, notes)
    assert (qlora["bf16"], qlora["fp16"], qlora["gradient_checkpointing"]) == (True, False, True)
    assert qlora["per_device_train_batch_size"] == 2 and qlora["max_length"] == min(2048, TINY.context_length)
    lora = training_settings(config("lora"), TINY, empty_sections(), "cuda", "float16", True, notes)
    assert (lora["bf16"], lora["fp16"], lora["gradient_checkpointing"], lora["per_device_train_batch_size"]) == (
        False, True, False, 4)
    assert notes == []


@pytest.mark.parametrize(("method", "given", "message"), [
    ("lora", {"QuantizationConfig": {"load_in_4bit": True}}, "contradict method lora"),
    ("qlora", {"ModelConfig": {"load_in_8bit": True}}, "method qlora needs load_in_4bit"),
    ("qlora", {"QuantizationConfig": {"quant_method": "gptq"}}, "quant_method: 'gptq' is not supported"),
    ("lora", {"LoraConfig": {"layers_pattern": "layers"}}, r"training_config\.LoraConfig: .*layers_to_transform"),
    ("lora", {"TrainingArguments": {"lr_scheduler_type": "wobbly"}}, r"training_config\.TrainingArguments: .*wobbly"),
])
def test_values_the_libraries_refuse_fail_before_loading_with_the_section(method, given, message):
    with pytest.raises(StepError, match=message):
        make_plan(config(method), TINY, sections(**given), "cpu")


# -- report_to (issue 19) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "uri", "expected", "noted"),
    [
        (None, None, "none", None),
        ("tensorboard", None, ["tensorboard"], None),
        (["tensorboard", "wandb"], None, ["tensorboard"], "report_to wandb ignored"),
        ("mlflow", None, "none", "MLFLOW_TRACKING_URI is not set"),
        ("all", None, ["tensorboard"], "MLFLOW_TRACKING_URI is not set"),
    ],
)
def test_report_to_keeps_the_trackers_this_image_can_feed(monkeypatch, requested, uri, expected, noted):
    from steps.tune.plan import reporting_settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notes: list[str] = []
    assert reporting_settings(requested, notes) == expected
    assert (noted is None and notes == []) or any(noted in n for n in notes), notes


def test_mlflow_needs_its_uri_and_the_package(monkeypatch):
    import importlib.util

    from steps.tune import plan as plan_module

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    real = importlib.util.find_spec
    notes: list[str] = []
    monkeypatch.setattr(plan_module.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    assert plan_module.reporting_settings("mlflow", notes) == "none" and "mlflow is not installed" in notes[0]
    monkeypatch.setattr(plan_module.importlib.util, "find_spec", lambda name: object() if name == "mlflow" else real(name))
    assert plan_module.reporting_settings(["mlflow", "tensorboard"], []) == ["mlflow", "tensorboard"]


def test_report_to_from_the_config_reaches_the_trainer_and_may_change_on_resume():
    from steps.tune.checkpoints import run_identity

    given = sections(TrainingArguments={"report_to": "tensorboard"})
    plan = make_plan(config(), TINY, given, "cpu")
    assert plan.training.report_to == ["tensorboard"] and not any("report_to" in n for n in plan.notes)
    plain = make_plan(config(), TINY, empty_sections(), "cpu")
    assert plain.training.report_to == [] or plain.training.report_to == "none" or plain.training.report_to == ["none"]
    assert run_identity(config(), plan, "sha256:x") == run_identity(config(), plain, "sha256:x")


def test_the_global_batch_is_divided_among_the_ranks():
    """(The SFTConfig itself is built in the ranks, where torchrun's environment lets it join the group.)"""
    from steps.tune.parallel import Ranks
    from steps.tune.plan import parallel_settings

    training = training_settings(config(batch_size=4), TINY, empty_sections(), "cpu", "float32", False, [])
    record, per_rank = parallel_settings(training, Ranks(world_size=2, rank=1, local_rank=1), "cpu", [])
    assert record == {"processes": 2, "global_batch": 4, "per_process_batch": 2,
                      "per_process_gradient_accumulation_steps": 1}
    assert per_rank == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "ddp_backend": "gloo",
                        "ddp_find_unused_parameters": False}
    assert parallel_settings(training, Ranks(), "cpu", []) == (
        {"processes": 1, "global_batch": 4, "per_process_batch": 4, "per_process_gradient_accumulation_steps": 1}, {})
    notes: list[str] = []
    record, per_rank = parallel_settings(dict(training, per_device_train_batch_size=1), Ranks(2, 0, 0), "cuda", notes)
    assert record["global_batch"] == 2 and per_rank["ddp_backend"] == "nccl" and "raised to 2" in notes[0]
