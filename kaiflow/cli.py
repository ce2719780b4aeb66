"""`kaiflow`: a thin command line over api/, presets/, pipelines/ and steps/.

Every subcommand imports what it needs when it runs, so `kaiflow validate` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


EXIT_CODES = """exit codes:
  0  every Workspace is valid (render/run: done)
  1  a Workspace is invalid (each error names its field), or a run's task failed
  2  usage error (bad flags, unreadable option) or an internal error"""


def _print_warnings(source: str, warnings: list) -> None:
    for warning in warnings:
        print(f"warning: {source}: {warning}", file=sys.stderr)


def _workspace_summary(ws) -> dict:
    """What kaiflow will run for a valid Workspace: model, sizing, SKU, node count."""
    from api import defaults
    from presets.gpus import requirement

    model = defaults.preset(ws)
    method = defaults.tuning_method(ws)
    summary = {
        "name": ws.name, "namespace": ws.namespace, "kind": "tuning" if ws.tuning else "inference",
        "model": model.name, "hfId": model.hf_id, "servedModelName": model.served_name, "method": method,
    }
    try:
        summary["instanceType"] = defaults.instance_type(ws)
    except ValueError as exc:  # a generic model without instanceType is refused in validation
        summary["instanceType"] = None
        summary["note"] = str(exc)
    summary["picked"] = bool(summary["instanceType"]) and not (ws.resource and ws.resource.instance_type)
    summary["ownNodes"] = defaults.uses_own_nodes(ws)
    summary["targetNodeCount"] = defaults.target_node_count(ws)
    summary["gpuMemoryGiB"] = round(requirement(model, method).total_gib, 1) if model.sized else None
    return summary


def _validate(args: argparse.Namespace) -> int:
    from api import WorkspaceValidationError
    from api.workspace_validation import load_bundle

    results, failed = [], 0
    for file in args.files:
        try:
            bundle = load_bundle(file, mode=args.mode)
        except WorkspaceValidationError as exc:
            failed += 1
            results.append({"file": str(exc.source or file), "valid": False, "errors": [
                {"path": e.path, "message": e.message} for e in exc.errors]})
            if args.output == "text":
                print(f"FAIL {exc.source or file}", file=sys.stderr)
                for error in exc.errors:
                    print(f"  - {error}", file=sys.stderr)
            continue
        _print_warnings(bundle.source, bundle.warnings)
        summaries = [_workspace_summary(ws) for ws in bundle.workspaces]
        results.append({"file": bundle.source, "valid": True, "workspaces": summaries,
                        "warnings": [{"path": w.path, "message": w.message} for w in bundle.warnings]})
        if args.output == "text":
            for s in summaries:
                sku = s["instanceType"] or ("bring-your-own nodes" if s["ownNodes"] else "-")
                sku += " (picked)" if s["picked"] else ""
                what = f"{s['method']} tuning" if s["method"] else "inference"
                size = f" ≈{s['gpuMemoryGiB']:.1f} GiB" if s["gpuMemoryGiB"] is not None else " (size checked at run time)"
                print(f"ok   {bundle.source}: {s['name']} — {s['model']} {what}{size} on {sku}")
    if args.output != "text":
        _dump(results, args.output)
    return 1 if failed else 0


def _dump(data: object, fmt: str) -> None:
    if fmt == "json":
        import json

        print(json.dumps(data, indent=2))
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, width=120))


def _preset_row(p) -> dict:
    from presets.gpus import pick_instance
    from presets.sizing import estimate_inference, estimate_tuning

    def gib(fn) -> float | None:
        try:
            return round(fn().total_gib, 1)
        except ValueError:
            return None

    def sku(method) -> str | None:
        try:
            return pick_instance(p, method).name
        except ValueError:
            return None

    return {
        "name": p.name, "aliases": list(p.aliases), "hfId": p.hf_id, "servedModelName": p.served_name,
        "origin": p.origin, "architecture": p.family, "paramsB": round(p.params_b, 3),
        "contextLength": p.context_length, "quantization": p.quantization, "tuning": p.tuning,
        "inferenceGiB": gib(lambda: estimate_inference(p)),
        "qloraGiB": gib(lambda: estimate_tuning(p, "qlora")) if p.tuning else None,
        "loraGiB": gib(lambda: estimate_tuning(p, "lora")) if p.tuning else None,
        "inferenceSku": sku(None), "qloraSku": sku("qlora") if p.tuning else None,
        "kaito": {"inferenceGiB": p.kaito.inference_gib, "tuningQloraGiB": p.kaito.tuning_qlora_gib},
    }


def _presets(args: argparse.Namespace) -> int:
    from presets import list_presets

    rows = [_preset_row(p) for p in list_presets()]
    if args.output != "text":
        _dump(rows, args.output)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kaiflow presets and Kaito's catalogue (GPU memory estimates in GiB; see docs/gpu-sizing.md); "
                  "any other HuggingFace ID 'org/name' is accepted as a generic model")
    for column in ("name (aliases)", "served as", "params", "context", "inference", "QLoRA", "LoRA",
                   "smallest SKU (inference / QLoRA)", "Kaito inf/QLoRA"):
        table.add_column(column)

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        params = f"{r['paramsB']:.2f}B" if r["paramsB"] >= 0.1 else f"{r['paramsB'] * 1000:.1f}M"
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        skus = f"{r['inferenceSku'] or 'multi-node'} / {r['qloraSku'] or '-'}"
        kaito = f"{r['kaito']['inferenceGiB'] or '-'} / {r['kaito']['tuningQloraGiB'] or '-'}"
        table.add_row(name, r["servedModelName"], params, str(r["contextLength"]), fmt(r["inferenceGiB"]),
                      fmt(r["qloraGiB"]), fmt(r["loraGiB"]), skus, kaito)
    Console(width=220).print(table)
    return 0


def _crd(args: argparse.Namespace) -> int:
    from api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


# etcd refuses objects over 1.5 MiB; Argo stores the Workflow with its status as one object, so
# the spec gets a third of that at most.
MAX_RENDERED_BYTES = 1024 * 1024


def _render(args: argparse.Namespace) -> int:
    import yaml

    from api import WorkspaceValidationError
    from api.inference_config import read_inference_config
    from api.workspace_validation import load_bundle
    from pipelines import PipelineError, render

    try:
        bundle = load_bundle(args.file, mode="cluster")
        _print_warnings(bundle.source, bundle.warnings)
        parts: list[str] = []
        for ws in bundle.workspaces:
            companions = bundle.companions_for(ws)
            for doc in companions:  # the Workflow runs in the Workspace's namespace; so must these
                doc.setdefault("metadata", {}).setdefault("namespace", ws.namespace)
            inference_map = bundle.config_map(ws.inference.config if ws.inference else None)
            service_env = read_inference_config(inference_map).as_env() if inference_map is not None else None
            workflow = render(ws, service_env=service_env)
            if len(workflow.encode()) > MAX_RENDERED_BYTES:
                print(f"error: {bundle.source}: {ws.name}: the rendered Workflow is {len(workflow.encode())} bytes, over "
                      f"the {MAX_RENDERED_BYTES}-byte limit for one Kubernetes object (etcd); shorten the URL list",
                      file=sys.stderr)
                return 1
            parts += [yaml.safe_dump(doc, sort_keys=False, width=120) for doc in companions] + [workflow]
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("---\n".join(parts))
    return 0


def _run(args: argparse.Namespace) -> int:
    """0 every task finished; 1 invalid Workspace or a task failed; 2 the DAG cannot run here."""
    from api import WorkspaceValidationError
    from api.workspace_validation import load_bundle
    from local_runner.runner import run_cli

    try:
        bundle = load_bundle(args.file, mode="local")
        _print_warnings(bundle.source, bundle.warnings)
        return run_cli(args.file, args.workdir, resume=args.resume)
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1


# `kaiflow run` starts the local service from <workdir>/serve (the deploy task's own workdir).
SERVE_SUBDIR = "serve"


def _chat(args: argparse.Namespace) -> int:
    from serving_bento.client import ChatError, chat
    from stepkit.common import StepError
    from steps.deploy.local_service import resolve_url

    try:
        answer = chat(
            resolve_url(args.url or args.workdir / SERVE_SUBDIR),
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
    except (StepError, ChatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from steps.deploy.local_service import stop_local

    stopped = stop_local(args.workdir / SERVE_SUBDIR)
    print("stopped the local service" if stopped else f"no local service was running from {args.workdir}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from local_runner.local_registry import LocalRegistryError, serve

    password = None
    if args.username:
        if args.password_file is None:
            print("error: --username needs --password-file", file=sys.stderr)
            return 2
        password = args.password_file.read_text().strip()
    try:
        return serve(args.port, args.root, username=args.username, password=password)
    except LocalRegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _controller(options: Sequence[str]) -> int:
    """Replace this process with the operator (same pid, so signals reach it directly)."""
    import os

    os.execv(sys.executable, [sys.executable, "-m", "controller", *options])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaiflow", description="Kaito Workspaces on Argo Workflows, or on this machine.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check Workspace files with Kaito's rules; exit 1 on any error",
                       description="Check Workspace files (with their ConfigMaps/PVCs; '-' reads standard input). "
                       "Warnings go to standard error.", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="Workspace YAML files, or - for standard input")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    p.add_argument("--mode", choices=("cluster", "local"), default="cluster",
                   help="cluster (default): rules for render/Argo; local: rules for `kaiflow run` (file: URLs, 127.0.0.1)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("presets", help="list model presets and Kaito's catalogue with their GPU memory needs")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    p.set_defaults(func=_presets)

    p = sub.add_parser("crd", help="print the Workspace CustomResourceDefinition")
    p.set_defaults(func=_crd)

    p = sub.add_parser("render", help="print the Argo Workflow (or CronWorkflow) for a Workspace, after the "
                       "ConfigMaps/PVCs of the same file that it uses")
    p.add_argument("file", help="Workspace YAML file, or - for standard input")
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

    p = sub.add_parser("registry", help="run a local OCI registry on 127.0.0.1 in the foreground (Ctrl-C stops it)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000, where the local examples push)")
    p.add_argument("--root", type=Path, default=Path(".kaiflow") / "registry", help="config and storage directory")
    p.add_argument("--username", help="require this user (htpasswd); steps then need --docker-config")
    p.add_argument("--password-file", type=Path, help="file holding the password for --username")
    p.set_defaults(func=_registry)

    p = sub.add_parser("controller", help="run the operator: Workspaces in the cluster become Argo Workflows",
                       add_help=False)
    p.add_argument("options", nargs=argparse.REMAINDER, help="see `kaiflow controller --help`")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaiflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["controller"]:  # its options are the operator's own (controller/options.py)
        return _controller(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `kaiflow render x.yaml | head`
        return 0
    except Exception as exc:  # exit 2, one line: the exit-code contract in --help
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
