"""What comparing like with like costs: the eval gate with and without ``--dataset-dir``.

Two LoRA adapters of one preset are tuned briefly, the first on rows fetched from a URL and the
second after the rows at the URL changed; the first is pushed to a local registry (Debian's
docker-registry, ``tests.fixtures.registry``) as ``latest``. Then ``python -m steps.eval_gate`` runs
as the pipeline runs it, in its own process, once comparing with the manifest annotation and once
scoring both adapters on the candidate's held-out rows (pull by digest, one base-model load, two
evaluation passes). Reported: wall time of each gate process (imports included), the parts of the
same-rows pass (load, each evaluation), the held-out rows and tokens, and the decisions.

    .venv/bin/python -m bench.eval_gate_bench [--preset smollm2-135m-instruct] [--rows 200] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tune_bench import make_rows

ROOT = Path(__file__).resolve().parent.parent
EVAL_LINE = re.compile(r"held-out loss of (\w+) on (\d+) rows .*: ([0-9.]+) \(([0-9.]+) s\)")


def tune(preset: str, data: Path, out: Path, steps: int, max_length: int) -> Path:
    cmd = [sys.executable, "-m", "steps.tune", "--preset", preset, "--method", "lora", "--dataset-dir", str(data),
           "--output-dir", str(out / "adapter"), "--checkpoint-dir", str(out / "ckpt"), "--max-steps", str(steps),
           "--max-length", str(max_length), "--skip-initial-eval", "--outputs", str(out / "outputs")]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "adapter"


def gate(candidate: Path, image: str, outputs: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "steps.eval_gate", "--candidate-dir", str(candidate), "--current-image", image,
           "--insecure", "--outputs", str(outputs), *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    result = {"wall_s": round(wall, 2), **{p.name: p.read_text() for p in sorted(outputs.iterdir())}}
    for name, rows, loss, seconds in EVAL_LINE.findall(done.stderr):
        result[f"eval_{name}_s"] = float(seconds)
        result["rows"] = int(rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=200, help="rows at the URL; 10%% are held out")
    parser.add_argument("--steps", type=int, default=2, help="training steps per adapter (the gate's cost is what is measured)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="gate runs of each kind; the median is reported")
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)

    from presets.materialize import resolve_model
    from steps.fetch_dataset import FetchConfig, fetch_dataset
    from stepkit.oci import RegistryOptions
    from steps.push_adapter import PushConfig, push_adapter
    from tests.fixtures.registry import RegistryProcess

    resolve_model(args.preset)  # build/convert once, outside any timing
    with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp, RegistryProcess(Path(tmp) / "registry") as registry:
        work = Path(tmp)
        adapters = {}
        for name, seed in (("serving", 0), ("candidate", 1)):  # the rows at the URL changed in between
            (work / name).mkdir()
            source = work / name / "rows.jsonl"
            source.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows, seed=seed)))
            fetch_dataset(FetchConfig(url=[source.as_uri()], output_dir=work / name / "data"))
            adapters[name] = tune(args.preset, work / name / "data", work / name, args.steps, args.max_length)
        image = f"{registry.host}/adapters/gate-bench"
        push_adapter(PushConfig(str(adapters["serving"]), f"{image}:v1", also_tag=["latest"]), RegistryOptions(insecure=True))
        runs: dict[str, list[dict]] = {"annotation": [], "same_rows": []}
        for i in range(args.repeat):
            runs["annotation"].append(gate(adapters["candidate"], f"{image}:latest", work / f"out-a{i}"))
            runs["same_rows"].append(gate(adapters["candidate"], f"{image}:latest", work / f"out-s{i}",
                                          "--dataset-dir", str(work / "candidate" / "data")))
    weights = sum(f.stat().st_size for f in Path(resolve_model(args.preset)).glob("*.safetensors"))
    print(f"preset {args.preset} ({weights / 2**20:.0f} MiB safetensors), {os.cpu_count()} CPU threads, "
          f"{runs['same_rows'][0].get('rows')} held-out rows, max_length {args.max_length}, {args.repeat} run(s) each")
    for kind, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        parts = ""
        if kind == "same_rows":
            parts = ", evaluation candidate {:.1f} s + serving {:.1f} s".format(
                statistics.median(r.get("eval_candidate_s", float("nan")) for r in results),
                statistics.median(r.get("eval_serving_s", float("nan")) for r in results))
        last = results[-1]
        print(f"{kind:<11} wall {wall:6.1f} s{parts}; basis {last['gate-basis']}, promote {last['promote']}, "
              f"candidate {last['candidate-eval-loss']}, serving {last['current-eval-loss']}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
