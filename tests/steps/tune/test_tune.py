"""steps.tune: real LoRA/QLoRA training on CPU, Kaito config checks, reports and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepkit.common import StepError, read_output, run_step
from steps.fetch_dataset import FetchConfig, fetch_dataset
from tests.steps.tune.runs import SMOL, TINY, chat_rows, make_dataset, tune_argv

ROOT = Path(__file__).resolve().parents[3]

KAITO_QLORA_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: qlora-params-template
data:
  training_config.yaml: |
    training_config:
      ModelConfig:
        torch_dtype: "bfloat16"
        local_files_only: true
        device_map: "auto"
      QuantizationConfig:
        load_in_4bit: true
        bnb_4bit_quant_type: "nf4"
        bnb_4bit_compute_dtype: "bfloat16"
        bnb_4bit_use_double_quant: true
      LoraConfig:
        r: 8
        lora_alpha: 8
        lora_dropout: 0.0
      TrainingArguments:
        output_dir: "/mnt/results"
        ddp_find_unused_parameters: false
        save_strategy: "epoch"
        per_device_train_batch_size: 1
      DataCollator:
        mlm: true
      DatasetConfig:
        shuffle_dataset: true
        train_test_split: 1
"""

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tiny-data"), chat_rows(40))


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, tiny_data):
    """One LoRA run of the tiny model shared by the checks below (training is the slow part)."""
    from steps.tune import main

    work = tmp_path_factory.mktemp("tiny-lora")
    progress = work / "progress"
    os.environ["ARGO_PROGRESS_FILE"] = str(progress)
    try:
        code = run_step(main, tune_argv(work, TINY, "lora", tiny_data, "--max-steps", "4", "--save-steps", "4",
                                        "--max-length", "128", "--learning-rate", "0.01"))
    finally:
        del os.environ["ARGO_PROGRESS_FILE"]
    assert code == 0
    return work


def test_tiny_lora_writes_adapter_reports_and_outputs(tiny_lora):
    adapter = tiny_lora / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "kaiflow.json", "loss.json", "loss.png"):
        assert (adapter / name).stat().st_size > 0, name
    info = json.loads((adapter / "kaiflow.json").read_text())
    assert (info["preset"], info["method"], info["device"], info["dtype"]) == (TINY, "lora", "cpu", "float32")
    assert info["dataset_digest"].startswith("sha256:") and info["assistant_only_loss"] is True
    assert info["training"]["packing"] is True and info["training"]["gradient_checkpointing"] is False
    metrics = info["metrics"]
    assert metrics["steps"] == 4 and metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["peak_memory_bytes"] > 50 * 2**20 and metrics["memory_estimate"]["total_bytes"] > 0
    assert metrics["eval_loss"] < metrics["eval_loss_initial"]
    losses = json.loads((adapter / "loss.json").read_text())["train"]
    assert [e["step"] for e in losses] == [1, 2, 3, 4]
    assert (adapter / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert float(read_output(tiny_lora / "outputs", "train-loss")) == pytest.approx(metrics["train_loss"], abs=1e-5)
    assert float(read_output(tiny_lora / "outputs", "eval-loss")) == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert (tiny_lora / "progress").read_text() == "4/4\n"
    assert (tiny_lora / "ckpt" / "checkpoint-4" / "kaiflow-complete").exists()


def test_adapter_loads_with_peft_and_changes_the_output(tiny_lora):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from presets.materialize import resolve_model

    base_path = resolve_model(TINY)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = tokenizer("Tell me about Kubernetes.", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, tiny_lora / "adapter")
        after = tuned(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_extending_max_steps_resumes_from_the_checkpoint(tiny_lora, tiny_data):
    from steps.tune import main

    argv = tune_argv(tiny_lora, TINY, "lora", tiny_data, "--max-steps", "6", "--save-steps", "4",
                     "--max-length", "128", "--learning-rate", "0.01")
    assert run_step(main, argv) == 0
    metrics = json.loads((tiny_lora / "adapter" / "kaiflow.json").read_text())["metrics"]
    assert (metrics["resumed_from_step"], metrics["steps"]) == (4, 6)
    # the history before the checkpoint came back with it
    assert [e["step"] for e in json.loads((tiny_lora / "adapter" / "loss.json").read_text())["train"]] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_of_another_run_are_refused(tiny_lora, tiny_data, capsys):
    from steps.tune import main

    argv = tune_argv(tiny_lora, TINY, "qlora", tiny_data, "--max-steps", "2", "--max-length", "128")
    assert run_step(main, argv) == 2
    assert "holds checkpoints of another run (method differs" in capsys.readouterr().err


def test_tiny_qlora_with_kaitos_default_configmap(tmp_path, tiny_data):
    from steps.tune import main

    config = tmp_path / "qlora-params.yaml"
    config.write_text(KAITO_QLORA_TEMPLATE)
    argv = tune_argv(tmp_path, TINY, "qlora", tiny_data, "--config", str(config), "--max-steps", "2", "--max-length", "128")
    assert run_step(main, argv) == 0
    info = json.loads((tmp_path / "adapter" / "kaiflow.json").read_text())
    assert info["quantization"]["bnb_4bit_quant_type"] == "nf4" and info["quantization"]["bnb_4bit_use_double_quant"]
    # device-aware: Kaito's bf16 settings are overridden on CPU, and said so
    assert info["quantization"]["bnb_4bit_compute_dtype"] == "float32" and info["dtype"] == "float32"
    assert info["lora"]["lora_alpha"] == 8 and info["training"]["per_device_train_batch_size"] == 1
    notes = "\n".join(info["config_notes"])
    assert "torch_dtype=bfloat16 ignored on CPU" in notes and "save_strategy='epoch' ignored" in notes
    assert info["metrics"]["steps"] == 2
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert any("lora_A" in key for key in f.keys())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("training_config:\n  LoraConfig:\n    rank: 8\n", r"training_config\.LoraConfig\.rank: unknown key"),
        ("training_config:\n  TrainingArguments:\n    learning_rat: 0.1\n", r"TrainingArguments\.learning_rat: unknown key \(did you mean 'learning_rate'"),
        ("training_config:\n  ModelConfigs: {}\n", r"training_config\.ModelConfigs: unknown section \(did you mean 'ModelConfig'"),
        ("training_config:\n  QuantizationConfig:\n    load_in_3bit: true\n", r"QuantizationConfig\.load_in_3bit: unknown key"),
        ("training_config:\n  DatasetConfig:\n    shuffle: true\n", r"DatasetConfig\.shuffle: unknown key"),
        ("ModelConfig: {}\n", r"expected a top-level 'training_config:' mapping"),
        ("training_config: [1\n", r"not valid YAML"),
    ],
)
def test_training_config_errors_name_the_key(tmp_path, body, message):
    from steps.tune.kaito_training_config import read_training_config

    path = tmp_path / "training_config.yaml"
    path.write_text(body)
    with pytest.raises(StepError, match=message):
        read_training_config(path)


def test_contradicting_quantization_and_bad_input_exit_2(tmp_path, tiny_data, capsys):
    from steps.tune import main

    config = tmp_path / "c.yaml"
    config.write_text("training_config:\n  QuantizationConfig:\n    load_in_4bit: true\n")
    assert run_step(main, tune_argv(tmp_path, TINY, "lora", tiny_data, "--config", str(config))) == 2
    assert "contradict method lora" in capsys.readouterr().err
    assert run_step(main, tune_argv(tmp_path, "phi3", "lora", tiny_data)) == 2
    assert "unknown preset 'phi3'" in capsys.readouterr().err
    assert run_step(main, tune_argv(tmp_path, TINY, "lora", tmp_path / "nowhere")) == 2
    assert "no train.parquet" in capsys.readouterr().err


def test_plain_text_rows_train_as_causal_lm(tmp_path):
    from steps.tune import main

    source = tmp_path / "text.jsonl"
    source.write_text("".join(json.dumps({"text": f"Kubernetes runs containers, fact {i}."}) + "\n" for i in range(20)))
    fetch_dataset(FetchConfig(url=[source.as_uri()], output_dir=tmp_path / "data"))
    assert run_step(main, tune_argv(tmp_path, TINY, "lora", tmp_path / "data", "--max-steps", "1", "--max-length", "64")) == 0
    info = json.loads((tmp_path / "adapter" / "kaiflow.json").read_text())
    assert info["data_kind"] == "text" and info["assistant_only_loss"] is False


def test_adapter_folder_appears_whole_or_not_at_all(tmp_path, tiny_data, monkeypatch):
    """A tune stopped while writing its adapter leaves the previous folder (or none), never half of one."""
    from steps.tune import main, run

    argv = tune_argv(tmp_path, TINY, "lora", tiny_data, "--max-steps", "1", "--max-length", "64", "--skip-initial-eval")
    adapter = tmp_path / "adapter"
    stale = tmp_path / ".adapter.partial-4242"  # what a killed run leaves behind
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half an adapter")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(run, "write_reports", disk_full)
        with pytest.raises(OSError, match="No space left"):
            main(argv)
    assert not adapter.exists() and sorted(p.name for p in tmp_path.glob(".adapter*")) == []

    assert main(argv) == 0
    first = (adapter / "kaiflow.json").read_text()
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "kaiflow.json",
                                                   "loss.json", "loss.png", "README.md"}

    with monkeypatch.context() as patch:
        patch.setattr(run, "write_reports", disk_full)
        with pytest.raises(OSError):
            main(argv)
    assert (adapter / "kaiflow.json").read_text() == first and (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.glob(".adapter*")) == []


def test_what_a_user_reads_log_curve_and_tensorboard(tmp_path, tiny_data):
    """Issue 19: one log line per logged step (console and KAIFLOW_STEP_LOG), no bars, each library
    warning once; held-out loss about ten times a run; TensorBoard events inside the adapter folder."""
    config = tmp_path / "c.yaml"
    config.write_text("training_config:\n  TrainingArguments:\n    report_to: tensorboard\n")
    cmd = [sys.executable, "-m", "steps.tune", *tune_argv(tmp_path, TINY, "lora", tiny_data, "--config", str(config),
                                                           "--max-steps", "20", "--max-length", "128")]
    env = dict(os.environ, KAIFLOW_STEP_LOG=str(tmp_path / "tune.log"))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    for text in (console, (tmp_path / "tune.log").read_text()):
        assert re.findall(r"step (\d+)/20 loss", text) == [str(i) for i in range(1, 21)]
        assert "{'loss'" not in text and "\r" not in text and "it/s]" not in text and "%|" not in text
        warned = [line.split(" ", 3)[3] for line in text.splitlines() if " WARNING " in line and " kaiflow" not in line]
        assert len(warned) == len(set(warned)), warned
    assert all(line.startswith("20") for line in done.stderr.splitlines()), "a line outside the log format"
    evals = json.loads((tmp_path / "adapter" / "loss.json").read_text())["eval"]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert len(re.findall(r"step \d+/20 held-out loss", console)) == len(evals)
    events = list((tmp_path / "adapter" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert float(read_output(tmp_path / "outputs", "eval-loss")) == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)


def test_the_loss_plot_draws_only_what_was_measured(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from steps.tune.report import plot_loss, smoothed, smoothing_weight

    assert smoothed([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    assert smoothing_weight(5) == 0 and smoothing_weight(20) == 0.6 and smoothing_weight(1000) == 0.95
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    losses = [{"step": i, "loss": 3 - i / 20} for i in range(1, 41)]
    plot_loss(tmp_path / "loss.png", losses, {"steps": 40, "tokens_per_s": 10.0},
              [{"step": 0, "eval_loss": 3.1}, {"step": 20, "eval_loss": 2.2}, {"step": 40, "eval_loss": 1.1}])
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    held_out = next(line for label, line in lines.items() if label.startswith("held-out"))
    assert held_out.get_linestyle() == "None" and list(held_out.get_xdata()) == [0, 20, 40]
    assert any("smoothed" in label for label in lines) and ax.get_xlabel() and ax.get_ylabel()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


# --- slow: the real small model -------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_held_out_loss_falls(tmp_path):
    from steps.tune import main

    data = make_dataset(tmp_path, chat_rows(200, seed=1), eval_fraction=0.08)
    argv = tune_argv(tmp_path, SMOL, "lora", data, "--max-steps", "6", "--max-length", "128", "--learning-rate", "0.001")
    assert run_step(main, argv) == 0
    metrics = json.loads((tmp_path / "adapter" / "kaiflow.json").read_text())["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] - 0.2, metrics
    assert metrics["train_loss"] < metrics["train_loss_first"]


@pytest.mark.slow
def test_smollm2_resumes_after_being_killed(tmp_path):
    data = make_dataset(tmp_path, chat_rows(60, seed=2), eval_fraction=0.02)
    cmd = [sys.executable, "-m", "steps.tune", *tune_argv(tmp_path, SMOL, "lora", data, "--max-steps", "6", "--save-steps", "2",
                                                           "--max-length", "64", "--skip-initial-eval")]
    env = dict(os.environ, KAIFLOW_OUTPUTS=str(tmp_path / "outputs"))
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "ckpt" / "checkpoint-2" / "kaiflow-complete"
    deadline = time.monotonic() + 240
    try:
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "no checkpoint appeared before the deadline"
        assert first.poll() is None, "the first run finished before it could be killed"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    assert not (tmp_path / "adapter" / "kaiflow.json").exists()
    second = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stderr
    metrics = json.loads((tmp_path / "adapter" / "kaiflow.json").read_text())["metrics"]
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] >= 2
