"""Write examples/data/demo_chat.parquet: a small, deterministic chat dataset for local runs.

300 conversations in the ``messages`` format (a list of ``{role, content}``), built from a few
templates about capitals, arithmetic and Kubernetes so that a tiny model's loss visibly falls
within a few dozen steps. Run ``python examples/data/make_demo_dataset.py`` to regenerate; the
output is byte-for-byte stable (fixed seed, no timestamps).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 300
SEED = 1234

CAPITALS = {
    "France": "Paris", "Sweden": "Stockholm", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima",
    "Canada": "Ottawa", "Egypt": "Cairo", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi",
}
K8S = {
    "a pod": "A pod is the smallest deployable unit in Kubernetes: one or more containers sharing a network.",
    "a node": "A node is a machine in the cluster that runs pods.",
    "a deployment": "A deployment keeps a set of identical pods running and rolls out new versions.",
    "a service": "A service gives a stable address to a set of pods.",
    "Argo Workflows": "Argo Workflows runs each step of a pipeline as a pod, ordered as a DAG.",
    "a LoRA adapter": "A LoRA adapter is a pair of small matrices per layer added to a frozen model.",
}


def conversation(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.choice(["capital", "sum", "k8s"])
    if kind == "capital":
        country, city = rng.choice(sorted(CAPITALS.items()))
        question, answer = f"What is the capital of {country}?", f"The capital of {country} is {city}."
    elif kind == "sum":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    else:
        thing, text = rng.choice(sorted(K8S.items()))
        question, answer = f"What is {thing}?", text
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a concise assistant."})
    return messages


def build(rows: int = ROWS, seed: int = SEED) -> pa.Table:
    rng = random.Random(seed)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"messages": pa.array([conversation(rng) for _ in range(rows)], type=pa.list_(message))})


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("demo_chat.parquet")
    pq.write_table(build(), out, compression="zstd")
    print(f"wrote {out} ({ROWS} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
