"""The local runner (``kaiflow run``): executes the Hera-built DAG on this machine.

The runner is not a second pipeline definition. It builds the Workflow with
``Target.local(workdir)`` (the only place local and cluster differ, see ``pipelines.target``),
takes the manifest Hera produced - the dict Argo would receive - and interprets the part of Argo's
semantics that manifest uses:

* tasks of the entrypoint DAG in dependency order (one at a time; Argo would run independent
  tasks in parallel, ours never are, apart from the two mutually exclusive push tasks);
* ``depends`` expressions (``a``, ``a.Succeeded``, ``&&``, ``||``, ``!``, parentheses) with Argo's
  rule that a bare ``a`` means ``a.Succeeded || a.Skipped || a.Daemoned``; a task whose
  ``depends`` is false is *Omitted*, as in Argo;
* ``{{tasks.T.outputs.parameters.X}}``, ``{{inputs.parameters.X}}``, ``{{workflow.*}}`` and
  ``{{pod.name}}`` (= the task name) substitution, then ``when`` conditions of the simple forms we
  generate (``x == y``, ``x != y``, compared as strings like Argo's govaluate does for bare words);
  a task whose ``when`` is false is *Skipped*;
* each template's container ``command`` + ``args`` run as a subprocess (``python`` is this
  interpreter - the pipeline image's Python), with its literal ``env``, ``ARGO_PROGRESS_FILE``
  pointing at ``<workdir>/progress/<task>`` (shown live), ``activeDeadlineSeconds`` as a timeout
  and ``retryStrategy.limit`` honoured (exit code 2, bad input, is never retried, like the
  rendered ``expression``; the backoff is shortened to seconds on one machine);
* output parameters read from each template's ``valueFrom.path`` after the task succeeds; a missing
  file fails the task, as Argo does.

State lives in ``<workdir>/state.json`` after every task: ``resume=True`` keeps the tasks that
finished (Succeeded, Skipped, Omitted) with their outputs and restarts at the first unfinished
one. The state records a digest of the manifest, so resuming after the Workspace changed is
refused rather than mixing outputs of two different pipelines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.structure import REFERENCE, check, task_dependencies, topological_order, workflow_spec

STATE_FILE = "state.json"
LOG_TAIL_LINES = 25
FINISHED = {"Succeeded", "Skipped", "Omitted"}
LOCAL_BACKOFF_CAP_S = 5.0
POLL_S = 0.25


class RunnerError(Exception):
    """The pipeline cannot run here (bad state, unsupported construct); one clear line."""


class RunFailed(Exception):
    """A task failed: which one, its exit code and the end of its log."""

    def __init__(self, task: str, exit_code: int | None, log_path: Path, log_tail: str, reason: str = ""):
        self.task = task
        self.exit_code = exit_code
        self.log_path = log_path
        self.log_tail = log_tail
        self.reason = reason
        detail = "; ".join(d for d in (f"exit code {exit_code}" if exit_code else "", reason) if d)
        super().__init__(f"task {task!r} failed ({detail}); log: {log_path}\n{log_tail}")


@dataclass
class TaskRecord:
    name: str
    template: str
    status: str = "Pending"
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    arguments: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    progress: str = ""
    started: float | None = None
    finished: float | None = None
    message: str = ""

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started


@dataclass
class RunResult:
    workdir: Path
    manifest: dict[str, Any]
    tasks: dict[str, TaskRecord]

    @property
    def order(self) -> list[str]:
        return list(self.tasks)

    def output(self, task: str, name: str) -> str:
        return self.tasks[task].outputs[name]


# -- Argo semantics ---------------------------------------------------------------------------


def evaluate_depends(expression: str, statuses: dict[str, str]) -> bool:
    """Argo's ``depends`` logic over the statuses of finished tasks."""

    def result(match: re.Match[str]) -> str:
        name, _, outcome = match.group(0).partition(".")
        status = statuses.get(name, "Pending")
        if not outcome:
            ok = status in {"Succeeded", "Skipped", "Daemoned"}
        elif outcome == "AnySucceeded" or outcome == "AllFailed":
            raise RunnerError(f"depends {expression!r}: {outcome} applies to withItems tasks, which kaiflow does not use")
        else:
            ok = status == outcome or (outcome == "Failed" and status == "Errored")
        return " True " if ok else " False "

    python = re.sub(r"[A-Za-z0-9_-]+(?:\.[A-Za-z]+)?", result, expression)
    python = python.replace("&&", " and ").replace("||", " or ").replace("!", " not ")
    if not re.fullmatch(r"[\sTrueFalsandort()]*", python):
        raise RunnerError(f"cannot evaluate depends expression {expression!r}")
    return bool(eval(python, {"__builtins__": {}}, {}))  # noqa: S307 - only True/False/and/or/not/() remain


def evaluate_when(expression: str) -> bool:
    """A substituted ``when``: ``a == b``, ``a != b`` or a bare true/false (string comparison)."""
    text = expression.strip()
    for op in ("!=", "=="):
        if op in text:
            left, right = (part.strip().strip("'\"") for part in text.split(op, 1))
            if any(tok in left + right for tok in ("&&", "||", "==", "!=")):
                break
            return (left == right) if op == "==" else (left != right)
    else:
        if text.lower() in {"true", "false"}:
            return text.lower() == "true"
    raise RunnerError(f"the local runner evaluates only 'a == b' / 'a != b' when-conditions, got {expression!r}")


def substitute(value: str, scope: dict[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        if key not in scope:
            raise RunnerError(f"{where}: unable to resolve {{{{{key}}}}}")
        return scope[key]

    return REFERENCE.sub(replace, value)


def _retry_limit(template: dict[str, Any]) -> int:
    strategy = template.get("retryStrategy") or {}
    return int(strategy.get("limit") or 0)


def _no_retry_codes(template: dict[str, Any]) -> set[int]:
    expression = (template.get("retryStrategy") or {}).get("expression") or ""
    return {int(c) for c in re.findall(r"exitCode\)\s*!=\s*(\d+)", expression)}


def _backoff(template: dict[str, Any], attempt: int) -> float:
    backoff = (template.get("retryStrategy") or {}).get("backoff") or {}
    factor = float(backoff.get("factor") or 1)
    return min(LOCAL_BACKOFF_CAP_S, 0.5 * factor ** (attempt - 1))


# -- the runner -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _steps_root() -> str:
    spec = importlib.util.find_spec("steps")
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError("the 'steps' package is not importable: install kaiflow (pip install -e .)")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalRun:
    """One execution of a manifest in a workdir; ``run()`` below is the usual entry point."""

    def __init__(self, manifest: dict[str, Any], workdir: Path, *, resume: bool = False,
                 on_update: Callable[[LocalRun], None] | None = None, env: dict[str, str] | None = None):
        check(manifest)
        self.manifest = manifest
        self.workdir = workdir
        self.spec = workflow_spec(manifest)
        self.templates = {t["name"]: t for t in self.spec["templates"]}
        entry = self.templates[self.spec["entrypoint"]]
        if "dag" not in entry:
            raise RunnerError(f"entrypoint {entry['name']!r} is not a DAG")
        self.tasks = {t["name"]: t for t in entry["dag"]["tasks"]}
        self.order = topological_order(entry["dag"]["tasks"])
        self.workflow_name = manifest["metadata"].get("name") or manifest["metadata"].get("generateName", "kaiflow-").rstrip("-")
        self.workflow_params = {p["name"]: str(p.get("value", "")) for p in
                                (self.spec.get("arguments") or {}).get("parameters") or []}
        self.on_update = on_update or (lambda _run: None)
        self.env = env
        self.records = {name: TaskRecord(name=name, template=self.tasks[name]["template"]) for name in self.order}
        self.state_path = workdir / STATE_FILE
        self.digest = _digest(manifest)
        if resume:
            self._load_state()

    # state ---------------------------------------------------------------------------------

    def _load_state(self) -> None:
        if not self.state_path.exists():
            raise RunnerError(f"nothing to resume: {self.state_path} does not exist")
        state = json.loads(self.state_path.read_text())
        if state.get("digest") != self.digest:
            raise RunnerError("the pipeline changed since the last run in this workdir (Workspace edited?); "
                              "run without --resume or use another --workdir")
        for name, data in state["tasks"].items():
            if name in self.records and data["status"] in FINISHED:
                self.records[name] = TaskRecord(**data)

    def save_state(self) -> None:
        state = {"digest": self.digest, "tasks": {n: asdict(r) for n, r in self.records.items()}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    # execution -----------------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        return {n: r.status for n, r in self.records.items()}

    def scope(self) -> dict[str, str]:
        scope = {"workflow.name": self.workflow_name,
                 "workflow.namespace": self.manifest["metadata"].get("namespace", "default")}
        scope |= {f"workflow.parameters.{k}": v for k, v in self.workflow_params.items()}
        for name, record in self.records.items():
            scope |= {f"tasks.{name}.outputs.parameters.{k}": v for k, v in record.outputs.items()}
        return scope

    def execute(self) -> RunResult:
        for sub in ("logs", "progress", "outputs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        for name in self.order:
            record = self.records[name]
            if record.status in FINISHED:
                continue
            self._run_task(name, record)
            self.save_state()
            self.on_update(self)
        return RunResult(self.workdir, self.manifest, self.records)

    def _run_task(self, name: str, record: TaskRecord) -> None:
        task = self.tasks[name]
        template = self.templates[task["template"]]
        where = f"task {name}"
        deps = task_dependencies(task)
        depends = task.get("depends") or " && ".join(deps)
        if depends and not evaluate_depends(depends, self.statuses()):
            record.status, record.message = "Omitted", f"depends {depends!r} is false"
            return
        scope = self.scope()
        arguments = {p["name"]: substitute(str(p.get("value", "")), scope, where)
                     for p in (task.get("arguments") or {}).get("parameters") or []}
        record.arguments = arguments
        if "when" in task:
            condition = substitute(task["when"], scope, where)
            if not evaluate_when(condition):
                record.status, record.message = "Skipped", f"when {condition!r} is false"
                return
        container = template.get("container")
        if container is None:
            raise RunnerError(f"{where}: template {template['name']!r} is not a container template")
        inputs = {}
        for param in (template.get("inputs") or {}).get("parameters") or []:
            value = arguments.get(param["name"], param.get("value", param.get("default")))
            if value is None:
                raise RunnerError(f"{where}: no value for input parameter {param['name']!r}")
            inputs[f"inputs.parameters.{param['name']}"] = str(value)
        local_scope = scope | inputs | {"pod.name": name}
        command = [substitute(str(c), local_scope, where) for c in container.get("command") or []]
        command += [substitute(str(a), local_scope, where) for a in container.get("args") or []]
        if command and command[0] in {"python", "python3"}:
            command[0] = sys.executable  # the pipeline image's Python is this interpreter here
        record.command = command
        progress_file = self.workdir / "progress" / name
        progress_file.unlink(missing_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_steps_root(), env.get("PYTHONPATH")) if p)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = substitute(str(var["value"]), local_scope, where)
        env["ARGO_PROGRESS_FILE"] = str(progress_file)
        log_path = self.workdir / "logs" / f"{name}.log"
        deadline = template.get("activeDeadlineSeconds")
        limit, no_retry = _retry_limit(template), _no_retry_codes(template)

        record.status, record.started, record.finished = "Running", time.time(), None
        record.attempts, record.exit_code, record.outputs = 0, None, {}
        with open(log_path, "w") as log:
            while True:
                record.attempts += 1
                log.write(f"# attempt {record.attempts}: {' '.join(command)}\n")
                log.flush()
                code, reason = self._spawn(command, env, log, progress_file, record, deadline)
                record.exit_code = code
                if code == 0 or record.attempts > limit or code in no_retry or code is None:
                    break
                wait = _backoff(template, record.attempts)
                log.write(f"# exit code {code}; retrying in {wait:.1f} s\n")
                log.flush()
                time.sleep(wait)
        record.finished = time.time()
        if code != 0:
            record.status, record.message = "Failed", reason or f"exit code {code}"
            self.save_state()
            raise RunFailed(name, code, log_path, _tail(log_path), reason)
        outputs = {}
        for param in (template.get("outputs") or {}).get("parameters") or []:
            path = Path(substitute(param["valueFrom"]["path"], local_scope, where))
            try:
                outputs[param["name"]] = path.read_text().strip()
            except OSError:
                record.status = "Failed"
                record.message = f"output parameter {param['name']!r} was not written to {path}"
                self.save_state()
                raise RunFailed(name, code, log_path, _tail(log_path), record.message) from None
        record.outputs = outputs
        for artifact in (template.get("outputs") or {}).get("artifacts") or []:
            path = Path(substitute(artifact["path"], local_scope, where))
            if path.exists():
                record.artifacts[artifact["name"]] = str(path)
            elif not artifact.get("optional"):
                record.status, record.message = "Failed", f"output artifact {artifact['name']!r} missing at {path}"
                self.save_state()
                raise RunFailed(name, code, log_path, _tail(log_path), record.message)
        record.status = "Succeeded"

    def _spawn(self, command: list[str], env: dict[str, str], log: Any, progress_file: Path,
               record: TaskRecord, deadline: int | None) -> tuple[int | None, str]:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=self.workdir, start_new_session=True)
        started = time.monotonic()
        try:
            while process.poll() is None:
                if deadline and time.monotonic() - started > deadline:
                    _kill_group(process)
                    return None, f"exceeded activeDeadlineSeconds={deadline}"
                try:
                    record.progress = progress_file.read_text().strip()
                except OSError:
                    pass
                self.on_update(self)
                time.sleep(POLL_S)
        except BaseException:  # Ctrl-C: the task runs in its own session, so end it here
            _kill_group(process)
            raise
        try:
            record.progress = progress_file.read_text().strip()
        except OSError:
            pass
        return process.returncode, ""


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """End a task and whatever it started in its session (not services that detached themselves)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# -- public entry point -------------------------------------------------------------------------


def local_manifest(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                   port: int | None = None, docker_config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The manifest ``run`` executes: the Workspace's Workflow built for ``Target.local``."""
    from api.workspace_validation import load_bundle

    from pipelines.target import TRAINING_CONFIG_KEY, Target
    from pipelines.workspace import build

    bundle = load_bundle(workspace_path, mode="local")
    if len(bundle.workspaces) != 1:
        raise RunnerError(f"{workspace_path}: kaiflow run takes one Workspace, found {len(bundle.workspaces)}")
    workspace = bundle.workspaces[0]
    # tuning.config naming a ConfigMap of the same file: its training_config.yaml is what the tune step reads.
    config_map = bundle.config_map(workspace.tuning.config if workspace.tuning else None)
    if config_map is not None:
        extracted = Path(workdir).resolve() / "configmaps" / config_map["metadata"]["name"] / TRAINING_CONFIG_KEY
        extracted.parent.mkdir(parents=True, exist_ok=True)
        extracted.write_text(config_map["data"][TRAINING_CONFIG_KEY])
        workspace = workspace.model_copy(update={"tuning": workspace.tuning.model_copy(update={"config": str(extracted)})})
    service_env = None
    inference_map = bundle.config_map(workspace.inference.config if workspace.inference else None)
    if inference_map is not None:
        from api.inference_config import read_inference_config

        service_env = read_inference_config(inference_map).as_env()
    target = Target.local(workdir, base_dir=Path(workspace_path).resolve().parent, port=port,
                          docker_config_file=docker_config)
    return build(workspace, target, service_env).to_dict()


def run(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], resume: bool = False, *,
        port: int | None = None, docker_config: str | os.PathLike[str] | None = None,
        console: Any = None, env: dict[str, str] | None = None) -> RunResult:
    """Run a Workspace's DAG on this machine; raise ``RunFailed`` at the first failing task.

    ``port`` is where a local deploy serves (a free one is picked, and kept for ``resume``);
    ``docker_config`` is the docker config file used in place of imagePushSecret/imagePullSecrets.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    settings_path = workdir / "run.json"
    if resume and settings_path.exists():
        settings = json.loads(settings_path.read_text())
        port = port or settings.get("port")
        docker_config = docker_config or settings.get("docker_config")
    port = port or _free_port()
    manifest = local_manifest(workspace_path, workdir, port=port, docker_config=docker_config)
    settings_path.write_text(json.dumps({"port": port, "docker_config": str(docker_config) if docker_config else None,
                                         "workspace": str(Path(workspace_path).resolve())}))
    from pipelines.progress import ProgressDisplay

    with ProgressDisplay(console=console) as display:
        local = LocalRun(manifest, workdir, resume=resume, on_update=display.update, env=env)
        display.update(local)
        try:
            return local.execute()
        finally:
            display.update(local)


def run_cli(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], resume: bool = False,
            console: Any = None) -> int:
    """``kaiflow run``: run, then print a summary or the failure; returns the exit code.

    0 all tasks finished; 1 a task failed (its name, exit code and log tail are printed, and
    ``--resume`` picks up from it); 2 the pipeline cannot run here (bad state, unsupported field).
    """
    from rich.console import Console

    from api import WorkspaceValidationError
    from pipelines.structure import StructureError
    from pipelines.workspace import PipelineError

    console = console or Console(stderr=True)
    try:
        result = run(workspace_path, workdir, resume=resume, console=console)
    except RunFailed as exc:
        detail = "; ".join(d for d in (f"exit code {exc.exit_code}" if exc.exit_code else "", exc.reason) if d)
        console.print(f"[bold red]task {exc.task} failed[/] ({detail})", highlight=False)
        console.print(exc.log_tail, markup=False, highlight=False)
        console.print(f"full log: {exc.log_path}\nafter fixing it: kaiflow run {workspace_path} "
                      f"--workdir {workdir} --resume", highlight=False)
        return 1
    except (RunnerError, PipelineError, StructureError, WorkspaceValidationError) as exc:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    for task, name in (("push-adapter", "image"), ("deploy-inference", "service-url")):
        record = result.tasks.get(task)
        if record and name in record.outputs:
            console.print(f"{task}: {name} = {record.outputs[name]}", highlight=False)
    console.print(f"logs: {result.workdir / 'logs'}", highlight=False)
    return 0
