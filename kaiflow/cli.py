"""`kaiflow`: a thin command line over api/, presets/, pipelines/ and steps/.

Every subcommand imports what it needs when it runs, so `kaiflow validate` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _validate(args: argparse.Namespace) -> int:
    from api import WorkspaceValidationError, load_workspaces
    from presets import get_preset
    from presets.gpus import pick_instance, requirement

    failed = 0
    for file in args.files:
        try:
            workspaces = load_workspaces(file)
        except WorkspaceValidationError as exc:
            failed += 1
            print(f"FAIL {file}", file=sys.stderr)
            for error in exc.errors:
                print(f"  - {error}", file=sys.stderr)
            continue
        for ws in workspaces:
            preset = get_preset(ws.preset_name) if ws.preset_name else None
            detail = ""
            if preset is not None:
                method = ws.tuning.method if ws.tuning else None
                need = requirement(preset, method)
                sku = (ws.resource.instance_type if ws.resource else None) or f"{pick_instance(preset, method).name} (picked)"
                what = f"{method} tuning" if method else "inference"
                detail = f" — {preset.name} {what} ≈{need.total_gib:.1f} GiB on {sku}"
            print(f"ok   {file}: {ws.name}{detail}")
    return 1 if failed else 0


def _presets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from presets import list_presets
    from presets.gpus import pick_instance
    from presets.sizing import estimate_inference, estimate_tuning

    table = Table(title="kaiflow presets (GPU memory estimates in GiB; see docs/gpu-sizing.md)")
    for column in ("preset", "params", "context", "tuning", "inference", "QLoRA", "LoRA", "smallest SKU (inference / QLoRA)", "Kaito inf/QLoRA"):
        table.add_column(column)
    for p in list_presets():
        inference = estimate_inference(p).total_gib
        qlora = f"{estimate_tuning(p, 'qlora').total_gib:.1f}" if p.tuning else "-"
        lora = f"{estimate_tuning(p, 'lora').total_gib:.1f}" if p.tuning else "-"
        skus = f"{pick_instance(p, None).name} / {pick_instance(p, 'qlora').name if p.tuning else '-'}"
        kaito = f"{p.kaito.inference_gib or '-'} / {p.kaito.tuning_qlora_gib or '-'}"
        params = f"{p.params_b:.2f}B" if p.params_b >= 0.1 else f"{p.params_b * 1000:.1f}M"
        table.add_row(p.name, params, str(p.context_length), "yes" if p.tuning else "no", f"{inference:.1f}", qlora, lora, skus, kaito)
    Console(width=200).print(table)
    return 0


def _crd(args: argparse.Namespace) -> int:
    from api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _render(args: argparse.Namespace) -> int:
    from api import WorkspaceValidationError, load_workspace
    from pipelines import PipelineError, render

    try:
        sys.stdout.write(render(load_workspace(args.file)))
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    """0 every task finished; 1 invalid Workspace or a task failed; 2 the DAG cannot run here."""
    from api import WorkspaceValidationError
    from pipelines.runner import run_cli

    try:
        return run_cli(args.file, args.workdir, resume=args.resume)
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1


# `kaiflow run` starts the local service from <workdir>/serve (the deploy task's own workdir).
SERVE_SUBDIR = "serve"


def _chat(args: argparse.Namespace) -> int:
    from steps.common import StepError
    from steps.deploy import chat

    try:
        answer = chat(
            args.url or args.workdir / SERVE_SUBDIR,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from steps.deploy import stop_local

    stopped = stop_local(args.workdir / SERVE_SUBDIR)
    print("stopped the local service" if stopped else f"no local service was running from {args.workdir}")
    return 0


def _controller(options: Sequence[str]) -> int:
    """Replace this process with the operator (same pid, so signals reach it directly)."""
    import os

    os.execv(sys.executable, [sys.executable, "-m", "controller", *options])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaiflow", description="Kaito Workspaces on Argo Workflows, or on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check Workspace files with Kaito's rules; exit 1 on any error")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=_validate)

    p = sub.add_parser("presets", help="list model presets with their GPU memory needs")
    p.set_defaults(func=_presets)

    p = sub.add_parser("crd", help="print the Workspace CustomResourceDefinition")
    p.set_defaults(func=_crd)

    p = sub.add_parser("render", help="print the Argo Workflow (or CronWorkflow) for a Workspace")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_render)

    p = sub.add_parser("run", help="run a Workspace's DAG on this machine (no cluster, no GPU needed)")
    p.add_argument("file", type=Path)
    p.add_argument("--workdir", type=Path, default=Path(".kaiflow"), help="where data, logs and state go")
    p.add_argument("--resume", action="store_true", help="continue from the first unfinished task")
    p.set_defaults(func=_run)

    p = sub.add_parser("chat", help="ask the service started by `kaiflow run`")
    p.add_argument("prompt")
    p.add_argument("--workdir", type=Path, default=Path(".kaiflow"))
    p.add_argument("--url", help="service URL (default: the one recorded in --workdir)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default, reproducible)")
    p.set_defaults(func=_chat)

    p = sub.add_parser("stop", help="stop the service started by `kaiflow run`")
    p.add_argument("--workdir", type=Path, default=Path(".kaiflow"))
    p.set_defaults(func=_stop)
    p = sub.add_parser("controller", help="run the operator: Workspaces in the cluster become Argo Workflows",
                       add_help=False)
    p.add_argument("options", nargs=argparse.REMAINDER, help="see `kaiflow controller --help`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["controller"]:  # its options are the operator's own (controller/options.py)
        return _controller(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
