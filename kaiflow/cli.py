"""`kaiflow`: a thin command line over api/, presets/, pipelines/, local_runner/ and steps/.

Built with Typer (click underneath) for three things argparse would need extra code for: shell
completion for bash, zsh and fish (`kaiflow completion SHELL`, click's completion machinery), every
option's default shown in its help, and one place per subcommand (a decorated function whose
signature is its command line). A new subcommand is one more ``@app.command()`` function.

The options follow kubectl's and argo's habits: ``-f/--filename`` (repeatable; files, directories,
``-R`` to descend, ``-`` for standard input), ``-n/--namespace``, ``-o/--output``,
``-p name=value`` for workflow arguments.

A subcommand imports the costly parts (hera, pydantic, the Kubernetes client; DEVELOPERS.md, "Imports")
when it runs, so `kaiflow validate` never loads torch and `kaiflow --help` stays quick.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from local_runner.local_registry import LocalRegistryError, serve
from presets import list_presets
from presets.gpus import pick_instance, requirement
from presets.sizing import estimate_inference, estimate_tuning
from serving_bento.client import ChatError
from serving_bento.client import chat as ask
from stepkit.common import StepError

EXIT_CODES = """\b
exit codes:
  0  every Workspace is valid (render/run: done)
  1  a Workspace is invalid (each error names its field), or a run's task failed
  2  usage error (bad flags, unreadable option) or an internal error"""

# What kubectl reads from a directory given to -f.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

app = typer.Typer(
    name="kaiflow",
    help="Kaito Workspaces on Argo Workflows, or on this machine.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,  # `kaiflow completion SHELL` instead of Typer's --install-completion
    rich_markup_mode=None,  # plain click help: the same layout on every terminal and in tests
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


class TextOutput(str, Enum):
    text = "text"
    json = "json"
    yaml = "yaml"


class RenderOutput(str, Enum):
    yaml = "yaml"
    json = "json"
    name = "name"


class Mode(str, Enum):
    cluster = "cluster"
    local = "local"


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


# -- options shared by validate, render and run (kubectl's -f, -R, -n; argo's -p) ----------------

FilesArgument = typer.Argument(None, help="Workspace files or directories, '-' for standard input (same as -f)",
                               show_default=False, metavar="FILE")
FilenameOption = typer.Option(None, "-f", "--filename", show_default=False, metavar="FILE",
                              help="a Workspace file, a directory of .yaml/.yml/.json files, or '-' for standard "
                              "input; repeatable")
RecursiveOption = typer.Option(False, "-R", "--recursive", help="descend into subdirectories of directories given with -f")
NamespaceOption = typer.Option(None, "-n", "--namespace", show_default=False, metavar="NS",
                               help="namespace for objects that name none (default: their metadata.namespace, else "
                               "'default'); an object naming another is refused, as kubectl does")
ParameterOption = typer.Option(None, "-p", "--parameter", show_default=False, metavar="NAME=VALUE",
                               help="set a workflow argument, as `argo submit -p` does; repeatable")


class UsageProblem(Exception):
    """A command line that cannot work (exit 2, like a bad flag); ``main`` prints it."""


def _usage(message: str) -> UsageProblem:
    return UsageProblem(message)


def expand_files(positional: Sequence[str] | None, flagged: Sequence[str] | None, recursive: bool = False) -> list[str]:
    """The files named on the command line, directories expanded as kubectl expands them."""
    found: list[str] = []
    for source in [*(positional or []), *(flagged or [])]:
        source = str(source)
        path = Path(source)
        if source == "-" or not path.is_dir():
            found.append(source)
            continue
        pattern = "**/*" if recursive else "*"
        files = sorted(str(f) for f in path.glob(pattern) if f.is_file() and f.suffix in MANIFEST_SUFFIXES)
        if not files:
            hint = "" if recursive else " (-R descends into subdirectories)"
            raise _usage(f"{source}: no {', '.join(MANIFEST_SUFFIXES)} files{hint}")
        found += files
    if not found:
        raise _usage("no Workspace file: give -f FILE (a file, a directory, or - for standard input)")
    if found.count("-") > 1:
        raise _usage("standard input ('-') can be read only once")
    return found


def parse_parameters(values: Sequence[str] | None) -> dict[str, str]:
    parameters: dict[str, str] = {}
    for value in values or []:
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise _usage(f"-p {value!r}: expected NAME=VALUE")
        parameters[name] = text
    return parameters


def set_parameters(manifest: dict[str, Any], parameters: dict[str, str], where: str) -> None:
    """Give ``spec.arguments.parameters`` new values (a CronWorkflow's in its workflowSpec)."""
    from pipelines.structure import workflow_spec

    if not parameters:
        return
    declared = {p["name"]: p for p in (workflow_spec(manifest).get("arguments") or {}).get("parameters") or []}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise _usage(f"{where}: unknown workflow parameter(s) {', '.join(unknown)}; "
                     f"this Workflow has: {', '.join(sorted(declared)) or 'none'}")
    for name, value in parameters.items():
        declared[name]["value"] = value


def _print_warnings(source: str, warnings: list) -> None:
    for warning in warnings:
        print(f"warning: {source}: {warning}", file=sys.stderr)


def _dump(data: object, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, width=120))


# -- validate ---------------------------------------------------------------------------------


def _workspace_summary(ws) -> dict:
    """What kaiflow will run for a valid Workspace: model, sizing, SKU, node count."""
    from api import defaults

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


@app.command(epilog=EXIT_CODES)
def validate(
    files: Optional[list[str]] = FilesArgument,
    filename: Optional[list[str]] = FilenameOption,
    recursive: bool = RecursiveOption,
    namespace: Optional[str] = NamespaceOption,
    output: TextOutput = typer.Option(TextOutput.text, "-o", "--output",
                                      help="text: one line per Workspace; json/yaml: one entry per file with the "
                                      "keys file, valid, workspaces, warnings, errors"),
    mode: Mode = typer.Option(Mode.cluster, "--mode",
                              help="cluster: the rules of render and Argo; local: the rules of `kaiflow run` "
                              "(file: URLs, 127.0.0.1 registries)"),
) -> int:
    """Check Workspace files with Kaito's rules (with their ConfigMaps, PVCs and Secrets); exit 1 on any error.

    Warnings go to standard error.
    """
    from api import WorkspaceValidationError
    from api.workspace_validation import load_bundle

    results, failed = [], 0
    for file in expand_files(files, filename, recursive):
        try:
            bundle = load_bundle(file, mode=mode.value, namespace=namespace)
        except WorkspaceValidationError as exc:
            failed += 1
            results.append({"file": str(exc.source or file), "valid": False, "workspaces": [], "warnings": [],
                            "errors": [{"path": e.path, "message": e.message} for e in exc.errors]})
            if output is TextOutput.text:
                print(f"FAIL {exc.source or file}", file=sys.stderr)
                for error in exc.errors:
                    print(f"  - {error}", file=sys.stderr)
            continue
        _print_warnings(bundle.source, bundle.warnings)
        summaries = [_workspace_summary(ws) for ws in bundle.workspaces]
        results.append({"file": bundle.source, "valid": True, "workspaces": summaries,
                        "warnings": [{"path": w.path, "message": w.message} for w in bundle.warnings], "errors": []})
        if output is TextOutput.text:
            for s in summaries:
                sku = s["instanceType"] or ("bring-your-own nodes" if s["ownNodes"] else "-")
                sku += " (picked)" if s["picked"] else ""
                what = f"{s['method']} tuning" if s["method"] else "inference"
                size = f" ≈{s['gpuMemoryGiB']:.1f} GiB" if s["gpuMemoryGiB"] is not None else " (size checked at run time)"
                print(f"ok   {bundle.source}: {s['name']} — {s['model']} {what}{size} on {sku}")
    if output is not TextOutput.text:
        _dump(results, output.value)
    return 1 if failed else 0


# -- presets, crd -----------------------------------------------------------------------------


def _preset_row(p) -> dict:
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


@app.command()
def presets(output: TextOutput = typer.Option(TextOutput.text, "-o", "--output", help="text: a table; json/yaml: one "
                                              "entry per model")) -> int:
    """List model presets and Kaito's catalogue with their GPU memory needs."""
    # rich: 27 ms of the CLI's ~170 ms start measured with -X importtime; only this table uses it
    from rich.console import Console
    from rich.table import Table

    rows = [_preset_row(p) for p in list_presets()]
    if output is not TextOutput.text:
        _dump(rows, output.value)
        return 0

    table = Table(title="kaiflow presets and Kaito's catalogue (GPU memory estimates in GiB; see "
                  "docs/reference/gpu-sizing.md); any other HuggingFace ID 'org/name' is accepted as a generic model")
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


@app.command()
def crd() -> int:
    """Print the Workspace CustomResourceDefinition (v1alpha1 + v1beta1, v1beta1 stored)."""
    from api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


# -- render -----------------------------------------------------------------------------------

# etcd refuses objects over 1.5 MiB; Argo stores the Workflow with its status as one object, so
# the spec gets a third of that at most.
MAX_RENDERED_BYTES = 1024 * 1024


# The rendered spec's hash in a Workflow's name: 40 bits, so two different specs with the same
# prefix do not meet by chance; the prefix is cut so the whole name stays a 63-character label
# (Argo puts it in a label of every pod).
NAME_HASH_CHARS = 10
# The kinds `argo submit` / `argo cron create` take from a stream; they ignore every other document.
WORKFLOW_KINDS = ("Workflow", "CronWorkflow")


class RenderRefused(Exception):
    """One line for standard error; exit 1."""


def name_for_apply(document: dict[str, Any]) -> dict[str, Any]:
    """Give a Workflow (or a CronWorkflow that lacks one) a ``metadata.name`` that is the same for the
    same rendered object: ``<generateName prefix>-<hash of everything else>``.

    ``kubectl apply`` needs a name (a ``generateName`` alone is refused); the same stream applied twice
    then finds its Workflow and runs nothing new. ``generateName`` stays, so ``argo resubmit`` names
    its runs as before. Changed in place and returned.
    """
    from pipelines.names import MAX_CRON_WORKFLOW_NAME, MAX_LABEL, dns1123_label

    metadata = document.get("metadata") or {}
    if metadata.get("name") or not metadata.get("generateName"):
        return document
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:NAME_HASH_CHARS]
    limit = MAX_CRON_WORKFLOW_NAME if document.get("kind") == "CronWorkflow" else MAX_LABEL
    prefix = dns1123_label(metadata["generateName"].rstrip("-"), limit - NAME_HASH_CHARS - 1)
    document["metadata"] = {"name": f"{prefix}-{digest}", **metadata}
    return document


def _training_config_target(bundle: Any, ws: Any) -> Any:
    """The cluster Target for ``ws``: with the training config of ``tuning.config`` carried inside the
    Workflow when this file has its ConfigMap (``None``: the default Target, the ConfigMap mounted).

    A text with ``{{`` is not carried: Argo would evaluate it as a template expression.
    """
    from pipelines import Target
    from pipelines.target import TRAINING_CONFIG_KEY

    config_map = bundle.config_map(ws.tuning.config) if ws.tuning is not None else None
    text = ((config_map or {}).get("data") or {}).get(TRAINING_CONFIG_KEY)
    if text is None:
        return None
    if "{{" in text:
        print(f"note: {bundle.source}: ConfigMap {ws.tuning.config}: its {TRAINING_CONFIG_KEY} contains '{{{{', which "
              "Argo would evaluate, so the Workflow mounts the ConfigMap instead of carrying the text", file=sys.stderr)
        return None
    return replace(Target.cluster(), training_config_text=text)


def _references(workflow: dict[str, Any]) -> set[tuple[str, str]]:
    """The (kind, name) of every Secret, ConfigMap and PVC a rendered Workflow uses by name: volumes,
    ``secretKeyRef``/``configMapKeyRef`` variables, and the ``--...-secret NAME`` arguments with which
    the deploy step hands a Secret to the service it rolls out."""
    found: set[tuple[str, str]] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("secretName"), str):
                found.add(("Secret", value["secretName"]))
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap"), ("configMap", "ConfigMap")):
                if isinstance(value.get(key), dict) and value[key].get("name"):
                    found.add((kind, value[key]["name"]))
            if isinstance(value.get("persistentVolumeClaim"), dict) and value["persistentVolumeClaim"].get("claimName"):
                found.add(("PersistentVolumeClaim", value["persistentVolumeClaim"]["claimName"]))
            args = value.get("args")
            if isinstance(args, list):
                found.update(("Secret", v) for flag, v in zip(args, args[1:])
                             if isinstance(flag, str) and flag.startswith("--") and flag.endswith("-secret"))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(workflow.get("spec"))
    return found


def submit_notes(documents: list[dict[str, Any]]) -> list[str]:
    """What ``argo submit`` (``argo cron create`` for a CronWorkflow) would lose of this stream: it
    takes only the Workflows and ignores every other document. One line per Workflow that uses one
    of those documents; none when the Workflows alone suffice."""
    others = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d
              for d in documents if d.get("kind") not in WORKFLOW_KINDS}
    notes = []
    for doc in documents:
        if doc.get("kind") not in WORKFLOW_KINDS:
            continue
        namespace = doc["metadata"].get("namespace")
        used = sorted(f"{kind}/{name}" for kind, name in _references(doc) if (kind, name, namespace) in others)
        if not used:
            continue
        command = "argo cron create" if doc["kind"] == "CronWorkflow" else "argo submit"
        notes.append(f"note: `{command}` takes only the {doc['kind']} of this stream; {_object_name(doc)} uses "
                     f"{', '.join(used)} from it, which must exist in namespace {namespace} before it runs "
                     "(`kubectl apply -f -` creates the whole stream)")
    return notes


def _object_name(doc: dict[str, Any]) -> str:
    """kubectl's ``-o name``: ``configmap/x``, ``workflow.argoproj.io/x`` (a generateName prefix when it has no name)."""
    kind = doc["kind"].lower()
    group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
    metadata = doc.get("metadata") or {}
    return f"{kind}.{group}/" * bool(group) + f"{kind}/" * (not group) + (metadata.get("name") or metadata.get("generateName", ""))


def _cluster_documents(file: str, namespace: str | None, parameters: dict[str, str]) -> list[dict[str, Any]]:
    """Secrets, then per Workspace its ConfigMaps/PVCs and its Workflow (named: ``name_for_apply``), the
    training config carried inside it when the file has its ConfigMap: what ``kubectl apply -f -`` takes."""
    from api.inference_config import read_inference_config
    from api.workspace_validation import load_bundle
    from pipelines import manifest, to_yaml

    bundle = load_bundle(file, mode="cluster", namespace=namespace)
    _print_warnings(bundle.source, bundle.warnings)
    namespaces = {ws.namespace for ws in bundle.workspaces}
    documents: list[dict[str, Any]] = []
    for secret in bundle.secrets:  # untouched but for the namespace the Workflow runs in, when it names none
        if len(namespaces) == 1 and not secret["metadata"].get("namespace"):
            secret["metadata"]["namespace"] = next(iter(namespaces))
        documents.append(secret)
    for ws in bundle.workspaces:
        companions = bundle.companions_for(ws)
        for doc in companions:  # the Workflow runs in the Workspace's namespace; so must these
            doc.setdefault("metadata", {}).setdefault("namespace", ws.namespace)
        inference_map = bundle.config_map(ws.inference.config if ws.inference else None)
        service_env = read_inference_config(inference_map).as_env() if inference_map is not None else None
        workflow = manifest(ws, _training_config_target(bundle, ws), service_env=service_env)
        set_parameters(workflow, parameters, f"{bundle.source}: {ws.name}")
        size = len(to_yaml(workflow).encode())
        if size > MAX_RENDERED_BYTES:
            raise RenderRefused(f"{bundle.source}: {ws.name}: the rendered Workflow is {size} bytes, over the "
                                f"{MAX_RENDERED_BYTES}-byte limit for one Kubernetes object (etcd); shorten the URL "
                                "list or the training config")
        documents += [*companions, name_for_apply(workflow)]
    return documents


def _local_documents(file: str, workdir: Path, namespace: str | None, parameters: dict[str, str]) -> list[dict[str, Any]]:
    """The manifest ``kaiflow run`` executes for this file and workdir (its parameters applied)."""
    from local_runner.runner import local_manifest

    workflow = local_manifest(file, workdir, namespace=namespace)
    set_parameters(workflow, parameters, file)
    return [workflow]


@app.command(epilog=EXIT_CODES)
def render(
    files: Optional[list[str]] = FilesArgument,
    filename: Optional[list[str]] = FilenameOption,
    recursive: bool = RecursiveOption,
    namespace: Optional[str] = NamespaceOption,
    output: RenderOutput = typer.Option(RenderOutput.yaml, "-o", "--output",
                                        help="yaml: a multi-document stream; json: a v1 List; name: kind/name per object"),
    target: Mode = typer.Option(Mode.cluster, "--target",
                                help="cluster: for `kubectl apply -f -`; local: the manifest `kaiflow run` executes"),
    workdir: Path = typer.Option(Path(".kaiflow"), "--workdir", metavar="DIR", help="--target local: the run's work folder, as "
                                 "`kaiflow run --workdir` (paths in the manifest point into it)"),
    parameter: Optional[list[str]] = ParameterOption,
) -> int:
    """Print every object a Workspace file needs: its Secrets, the ConfigMaps/PVCs each Workspace uses,
    and its Argo Workflow (or CronWorkflow for tuning.schedule), named from a hash of its content.

    Submit everything with `kaiflow render -f ws.yaml | kubectl apply -f -` (the same stream twice runs once).
    `argo submit` takes only the Workflow: enough when the Workflow uses no Secret of the file that is not in
    the cluster yet (a tuning.config ConfigMap of the file travels inside the Workflow); render says so on
    standard error otherwise.
    """
    from api import WorkspaceValidationError
    from pipelines import PipelineError, to_yaml

    parameters = parse_parameters(parameter)
    documents: list[dict[str, Any]] = []
    try:
        for file in expand_files(files, filename, recursive):
            if target is Mode.local:
                documents += _local_documents(file, workdir, namespace, parameters)
            else:
                documents += _cluster_documents(file, namespace, parameters)
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1
    except RenderRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if output is RenderOutput.name:
        print("\n".join(_object_name(d) for d in documents))
    elif output is RenderOutput.json:
        _dump({"apiVersion": "v1", "kind": "List", "items": documents}, "json")
    else:
        sys.stdout.write("---\n".join(to_yaml(d) for d in documents))
    if target is Mode.cluster and output is RenderOutput.yaml:  # the stream argo submit reads (not a List)
        for note in submit_notes(documents):
            print(note, file=sys.stderr)
    return 0


# -- run, chat, stop, registry ------------------------------------------------------------------

# `kaiflow run` starts the local service from <workdir>/serve (the deploy task's own workdir).
SERVE_SUBDIR = "serve"
WorkdirOption = typer.Option(Path(".kaiflow"), "--workdir", metavar="DIR", help="the run's work folder: data, logs, state, the service")


@app.command(epilog=EXIT_CODES)
def run(
    files: Optional[list[str]] = FilesArgument,
    filename: Optional[list[str]] = FilenameOption,
    namespace: Optional[str] = NamespaceOption,
    workdir: Path = WorkdirOption,
    resume: bool = typer.Option(False, "--resume", help="continue from the first unfinished task"),
    parameter: Optional[list[str]] = ParameterOption,
    check: bool = typer.Option(True, "--check/--no-check",
                               help="before the first task, check what the DAG needs outside it (registry, "
                               "dataset files, disk) and refuse with the fix"),
) -> int:
    """Run a Workspace's DAG on this machine (no cluster, no GPU needed).

    Before the first task it checks the registry the adapter goes to (the local default 127.0.0.1:5000 is
    started, as `kaiflow registry` would, when nothing answers there), the dataset files and the free disk.
    """
    from api import WorkspaceValidationError
    from api.workspace_validation import load_bundle
    from local_runner.runner import run_cli

    sources = expand_files(files, filename)
    if len(sources) != 1:
        raise _usage(f"kaiflow run takes one Workspace file, got {len(sources)}")
    source = sources[0]
    parameters = parse_parameters(parameter)
    base_dir = None
    if source == "-":  # read once: the runner reads the file again to build the manifest
        workdir.mkdir(parents=True, exist_ok=True)
        saved = workdir / "workspace.yaml"
        saved.write_bytes(sys.stdin.buffer.read())
        source, base_dir = str(saved), Path.cwd()  # relative file: URLs resolve as for a file here
    try:
        bundle = load_bundle(source, mode="local", namespace=namespace)
        _print_warnings(bundle.source, bundle.warnings)
        return run_cli(source, workdir, resume=resume, parameters=parameters or None, namespace=namespace,
                       preflight=check, base_dir=base_dir)
    except WorkspaceValidationError as exc:
        print(exc, file=sys.stderr)
        return 1


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="the question", metavar="PROMPT"),
    workdir: Path = WorkdirOption,
    url: Optional[str] = typer.Option(None, "--url", metavar="URL", help="service URL (default: the one `kaiflow run` recorded in --workdir)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="longest answer, in tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (reproducible)"),
) -> int:
    """Ask the service started by `kaiflow run`."""
    from steps.deploy.local_service import resolve_url

    try:
        answer = ask(resolve_url(url or workdir / SERVE_SUBDIR), prompt, max_new_tokens=max_new_tokens,
                     temperature=temperature)
    except (StepError, ChatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0


@app.command()
def stop(workdir: Path = WorkdirOption) -> int:
    """Stop the service started by `kaiflow run`."""
    from steps.deploy.local_service import stop_local

    stopped = stop_local(workdir / SERVE_SUBDIR)
    print("stopped the local service" if stopped else f"no local service was running from {workdir}")
    return 0


@app.command()
def registry(
    port: int = typer.Option(5000, "--port", help="port on 127.0.0.1 (the local examples push to 5000)"),
    root: Path = typer.Option(Path(".kaiflow") / "registry", "--root", metavar="DIR", help="config and storage directory"),
    username: Optional[str] = typer.Option(None, "--username", help="require this user (htpasswd); steps then need "
                                           "--docker-config", show_default=False),
    password_file: Optional[Path] = typer.Option(None, "--password-file", help="file holding the password for "
                                                 "--username", show_default=False),
) -> int:
    """Run a local OCI registry on 127.0.0.1 in the foreground (Ctrl-C stops it).

    The one way to start the registry the local examples push to; `kaiflow run` starts the same one
    itself (for the length of the run) when its Workspace pushes to 127.0.0.1:5000 and nothing answers there.
    """

    password = None
    if username:
        if password_file is None:
            raise _usage("--username needs --password-file")
        password = password_file.read_text().strip()
    try:
        return serve(port, root, username=username, password=password)
    except LocalRegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# -- completion, controller -------------------------------------------------------------------

COMPLETE_VAR = "_KAIFLOW_COMPLETE"


@app.command()
def completion(shell: Shell = typer.Argument(..., help="the shell to print the script for")) -> int:
    """Print the shell completion script.

    \b
    bash:  source <(kaiflow completion bash)        (or save it under /etc/bash_completion.d/)
    zsh:   source <(kaiflow completion zsh)         (after `autoload -U compinit; compinit`)
    fish:  kaiflow completion fish > ~/.config/fish/completions/kaiflow.fish
    """
    from typer.completion import get_completion_script

    print(get_completion_script(prog_name="kaiflow", complete_var=COMPLETE_VAR, shell=shell.value))
    return 0


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def controller(ctx: typer.Context) -> int:
    """Run the operator: Workspaces in the cluster become Argo Workflows (options: `kaiflow controller --help`)."""
    return _controller(ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def doctor(ctx: typer.Context) -> int:
    """Check a cluster for what kaiflow needs, one line per missing thing with its fix (`kaiflow doctor --help`)."""
    return _doctor(ctx.args)


def _doctor(options: Sequence[str]) -> int:
    from kaiflow.doctor import main as doctor_main  # kubernetes' client: only for this command

    return doctor_main(list(options))


def _controller(options: Sequence[str]) -> int:
    """Replace this process with the operator (same pid, so signals reach it directly)."""

    os.execv(sys.executable, [sys.executable, "-m", "controller", *options])
    return 0  # not reached


def _version() -> str:
    # importlib.metadata: 32 ms of the CLI's ~170 ms start (-X importtime); only --version reads it
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaiflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"kaiflow {_version()}")
        raise SystemExit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="print the version and exit")) -> None:
    """Kaito Workspaces on Argo Workflows, or on this machine."""


def command() -> Any:
    """The command tree (click's, as Typer vendors it): completion, the docs check, tests."""
    from typer.completion import completion_init

    completion_init()  # Typer's bash/zsh/fish protocol for $_KAIFLOW_COMPLETE (add_completion=False skips it)
    return typer.main.get_command(app)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["controller"]:  # its options are the operator's own (controller/options.py)
        return _controller(argv[1:])
    if argv[:1] == ["doctor"]:  # its options are its own (kaiflow/doctor.py)
        return _doctor(argv[1:])
    try:
        result = command().main(args=argv, prog_name="kaiflow", standalone_mode=False,
                                complete_var=COMPLETE_VAR)
        return int(result or 0)
    except UsageProblem as exc:  # exit 2, as a bad flag
        print(f"error: {exc} (see kaiflow {' '.join(argv[:1])} --help)", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return 130
    except typer.TyperException as exc:  # click's usage errors (bad flag, bad choice): exit 2, as argparse and kubectl
        if not hasattr(exc, "show"):
            raise
        exc.show()
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except BrokenPipeError:  # e.g. `kaiflow render x.yaml | head`
        return 0
    except Exception as exc:  # exit 2, one line: the exit-code contract in --help
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
