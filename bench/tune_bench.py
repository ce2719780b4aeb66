"""Tuning throughput: kaiflow's tune step vs Kaito's default recipe vs a plain trl script.

Same model, same rows, same LoRA method, one run. Each contender trains for one epoch over the
same training rows in its own process, so peak RSS is its own:

(a) ``python -m steps.tune`` — its CPU defaults: best-fit-decreasing packing, one padding-free row of
    512 tokens per step, attention per packed example, the LM head on labelled (assistant) tokens
    only, no gradient checkpointing, no LoRA dropout, fp32 compute;
(b) Kaito's default QLoRA recipe (``qlora-params-template`` + ``fine_tuning.py``):
    ``prepare_model_for_kbit_training`` (which turns on gradient checkpointing), LoRA r=8 α=8,
    ``per_device_train_batch_size: 1``, no packing, transformers' ``DataCollatorForLanguageModeling``;
(c) a plain hand-written trl script: ``SFTTrainer`` with ``SFTConfig`` defaults (padded batches of
    4, gradient checkpointing on), LoRA on all linear layers.

All three get fp32 compute (``bf16=False``, NF4 compute dtype float32): with Kaito's bf16 dtypes (b)
would be several times slower still on a CPU, and that would measure the CPU, not the recipe.
Throughput counts real tokens only (the attention mask's ones; (a) has no padding at all) over the
time spent in ``trainer.train()``; model loading and tokenisation are excluded for all three.

    .venv/bin/python -m bench.tune_bench [--preset smollm2-135m-instruct] [--method qlora] [--rows 160] [--runs 3]

Each recipe runs ``--runs`` times (default 3, interleaved a, b, c, a, b, c, ...); every run is
printed, and the table gives the median of each recipe, the ratios the medians' ratios.

``--procs N`` measures data parallelism instead: ``steps.tune`` with one process and with N
processes (gloo ranks on a CPU, one per GPU on a GPU machine), the same global batch of N packed
sequences per step (``--batch-size N``: one process takes all N, each rank one), the same rows;
throughput is all ranks' real tokens over the time in ``trainer.train()``. On a 2-core CPU
expect little gain: it checks the mechanics, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TOPICS = ["Kubernetes", "a LoRA adapter", "Argo Workflows", "the capital of France", "a GPU", "parquet files",
          "gradient descent", "a container image", "an OCI registry", "tokenisation"]
FACTS = ["It is widely used in production.", "It was designed to be simple.", "Many teams rely on it every day.",
         "It scales from a laptop to a large cluster.", "Its documentation explains the details.",
         "It keeps working when a node fails.", "It stores data efficiently.", "It can be configured declaratively.",
         "Engineers like how predictable it is.", "It saves both time and money."]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat rows whose answers vary from one to twelve sentences, like real instruction data."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        answer = " ".join(rng.choice(FACTS) for _ in range(rng.choice([1, 1, 2, 3, 4, 6, 8, 12])))
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me about {topic}."},
            {"role": "assistant", "content": f"{topic.capitalize()} is worth knowing. {answer}"},
        ]})
    return rows


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(kind: str, preset_name: str, method: str, data_dir: Path, max_length: int) -> dict:
    import torch
    from datasets import Dataset
    import pyarrow.parquet as pq
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling
    from trl import SFTConfig, SFTTrainer

    from presets.catalog import get_preset
    from presets.materialize import resolve_model

    preset = get_preset(preset_name)
    path = resolve_model(preset)
    train = Dataset(pq.read_table(data_dir / "train.parquet"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quant = None
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    out = tempfile.mkdtemp(prefix=f"bench-{kind}-")
    common = dict(output_dir=out, bf16=False, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                  num_train_epochs=1, learning_rate=2e-4, logging_steps=10, max_length=max_length,
                  include_num_input_tokens_seen="non_padding")
    if kind == "kaito":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant, device_map="cpu")
        if quant is not None:
            model = prepare_model_for_kbit_training(model)  # Kaito's fine_tuning.py; enables gradient checkpointing
        else:
            model.gradient_checkpointing_enable()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=list(preset.lora_target_modules)))
        model.config.use_cache = False
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                             args=SFTConfig(per_device_train_batch_size=1, gradient_checkpointing=True, **common),
                             data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False))
    elif kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant, device_map="cpu")
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train,
                             args=SFTConfig(per_device_train_batch_size=4, **common),
                             peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    else:
        raise SystemExit(f"unknown worker {kind}")
    started = time.perf_counter()
    try:
        trainer.train()
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)  # save_strategy "no": trl only made the folder
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss_bytes": peak_rss(),
            "steps": trainer.state.global_step}


def run_ours(preset: str, method: str, data_dir: Path, work: Path, max_length: int, *extra: str) -> dict:
    for name in ("a-adapter", "a-ckpt", "a-outputs"):  # each run trains from scratch
        subprocess.run(["rm", "-rf", str(work / name)], check=True)
    cmd = [sys.executable, "-m", "steps.tune", "--preset", preset, "--method", method, "--dataset-dir", str(data_dir),
           "--output-dir", str(work / "a-adapter"), "--checkpoint-dir", str(work / "a-ckpt"), "--epochs", "1",
           "--max-length", str(max_length), "--logging-steps", "1", "--skip-initial-eval", "--eval-points", "0",
           "--outputs", str(work / "a-outputs"), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((work / "a-adapter" / "kaiflow.json").read_text())["metrics"]
    return {"tokens": metrics["tokens"], "seconds": metrics["train_seconds"], "tokens_per_s": metrics["tokens_per_s"],
            "peak_rss_bytes": metrics["peak_memory_bytes"], "steps": metrics["steps"],
            "estimate_bytes": metrics["memory_estimate"]["total_bytes"],
            "loss_first": metrics["train_loss_first"], "loss_last": metrics["train_loss"]}


def run_worker(kind: str, preset: str, method: str, data_dir: Path, max_length: int) -> dict:
    cmd = [sys.executable, "-m", "bench.tune_bench", "--worker", kind, "--preset", preset, "--method", method,
           "--data-dir", str(data_dir), "--max-length", str(max_length)]
    done = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def print_table(results: dict[str, dict]) -> None:
    print(f"{'recipe':<18}{'tokens':>8}{'steps':>7}{'seconds':>9}{'tokens/s':>10}{'peak RSS MiB':>14}")
    for name, r in results.items():
        print(f"{name:<18}{r['tokens']:>8.0f}{r['steps']:>7.0f}{r['seconds']:>9.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['peak_rss_bytes'] / 2**20:>14.0f}")


def compare_recipes(args, work: Path) -> None:
    runs: dict[str, list[dict]] = {"a_kaiflow": [], "b_kaito_default": [], "c_plain_trl": []}
    for round_ in range(1, args.runs + 1):
        runs["a_kaiflow"].append(run_ours(args.preset, args.method, work / "data", work, args.max_length))
        runs["b_kaito_default"].append(run_worker("kaito", args.preset, args.method, work / "data", args.max_length))
        runs["c_plain_trl"].append(run_worker("plain", args.preset, args.method, work / "data", args.max_length))
        a, b, c = (runs[k][-1]["tokens_per_s"] for k in runs)
        print(f"run {round_}: tokens/s (a) {a:.1f}  (b) {b:.1f}  (c) {c:.1f}   (a)/(b) = {a / b:.2f}  (a)/(c) = {a / c:.2f}",
              flush=True)
    medians = {name: median_of(r) for name, r in runs.items()}
    print(f"median of {args.runs} runs:")
    print_table(medians)
    a = medians["a_kaiflow"]["tokens_per_s"]
    ab, ac = a / medians["b_kaito_default"]["tokens_per_s"], a / medians["c_plain_trl"]["tokens_per_s"]
    rss = medians["a_kaiflow"]["peak_rss_bytes"] / medians["b_kaito_default"]["peak_rss_bytes"]
    estimate = medians["a_kaiflow"]["estimate_bytes"]
    print(f"(a)/(b) = {ab:.2f} (goal >= 1.5)   (a)/(c) = {ac:.2f} (goal >= 1.3)   "
          f"peak RSS (a)/(b) = {rss:.2f} (goal <= 1.25, or counted by the estimate)")
    print(f"(a) peak RSS {medians['a_kaiflow']['peak_rss_bytes'] / 2**30:.2f} GiB measured, "
          f"{estimate / 2**30:.2f} GiB estimated by presets.sizing for its plan "
          f"({medians['a_kaiflow']['peak_rss_bytes'] / estimate:.2f}x)")
    losses = [(r["loss_first"], r["loss_last"]) for r in runs["a_kaiflow"]]
    print("(a) training loss first -> last logged: " + ", ".join(f"{f:.3f} -> {l:.3f}" for f, l in losses))
    print(json.dumps({"runs": runs, "medians": medians, "a_over_b": ab, "a_over_c": ac, "rss_a_over_b": rss}))


def compare_processes(args, work: Path) -> None:
    n = args.procs
    label = {1: "1 process", n: f"{n} processes"}
    runs: dict[int, list[dict]] = {1: [], n: []}
    for round_ in range(1, args.runs + 1):
        for procs in (1, n):
            runs[procs].append(run_ours(args.preset, args.method, work / "data", work, args.max_length,
                                        "--nproc", str(procs), "--batch-size", str(n)))
        one, many = runs[1][-1]["tokens_per_s"], runs[n][-1]["tokens_per_s"]
        print(f"run {round_}: tokens/s {label[1]} {one:.1f}, {label[n]} {many:.1f}  ({many / one:.2f}x)", flush=True)
    medians = {label[procs]: median_of(r) for procs, r in runs.items()}
    print(f"median of {args.runs} runs, global batch {n} packed sequences of {args.max_length} tokens per step:")
    print_table(medians)
    speedup = medians[label[n]]["tokens_per_s"] / medians[label[1]]["tokens_per_s"]
    print(f"{label[n]} / {label[1]} = {speedup:.2f}x")
    print(json.dumps({"runs": {label[p]: r for p, r in runs.items()}, "medians": medians, "speedup": speedup}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m-instruct")
    parser.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    parser.add_argument("--rows", type=int, default=28, help="rows fetched; ~90%% train one epoch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="runs of each recipe; the table gives the medians")
    parser.add_argument("--procs", type=int, help="compare steps.tune with 1 and with this many data-parallel processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.method, args.data_dir, args.max_length)))
        return

    from presets.materialize import resolve_model
    from steps.fetch_dataset import FetchConfig, fetch_dataset

    resolve_model(args.preset)  # build/convert once, outside any timing
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        work = Path(tmp)
        source = work / "rows.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
        summary = fetch_dataset(FetchConfig(url=[source.as_uri()], output_dir=work / "data"))
        print(f"model {args.preset}, method {args.method}, {summary['train_rows']} training rows, one epoch each, "
              f"{os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.procs and args.procs > 1:
            compare_processes(args, work)
        else:
            compare_recipes(args, work)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
