"""Datasets and command lines for real tunes in tests (shared by the tune and eval-gate tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from steps.fetch_dataset import FetchConfig, fetch_dataset

TINY = "kaiflow-tiny-test"
SMOL = "smollm2-135m-instruct"

TOPICS = ["Kubernetes", "a LoRA adapter", "Argo Workflows", "parquet files", "a GPU", "an OCI registry"]
FACTS = ["It is widely used.", "It was designed to be simple.", "Teams rely on it.", "It scales well.", "It stores data."]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Answers in one fixed house style: learnable, so held-out loss must fall when training works."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        facts = " ".join(rng.choice(FACTS) for _ in range(rng.randint(1, 4)))
        rows.append({"messages": [
            {"role": "user", "content": f"Tell me about {topic}."},
            {"role": "assistant", "content": f"Certainly! {topic.capitalize()}: {facts} Hope this helps, from kaiflow."},
        ]})
    return rows


def make_dataset(tmp_path: Path, rows: list[dict], eval_fraction: float = 0.15) -> Path:
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fetch_dataset(FetchConfig(url=[source.as_uri()], output_dir=tmp_path / "data", eval_fraction=eval_fraction))
    return tmp_path / "data"


def tune_argv(tmp_path: Path, preset: str, method: str, data: Path, *extra: str) -> list[str]:
    return [
        "--preset", preset, "--method", method, "--dataset-dir", str(data),
        "--output-dir", str(tmp_path / "adapter"), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--outputs", str(tmp_path / "outputs"), *extra,
    ]
