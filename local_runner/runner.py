"""The local runner (``kaiflow run``): executes the Hera-built DAG on this machine.

The runner is not a second pipeline definition. It builds the Workflow with
``Target.local(workdir)`` (the only place local and cluster differ, see ``pipelines.target``),
takes the manifest Hera produced - the dict Argo would receive - and interprets the part of Argo's
semantics that manifest uses:

* tasks of the entrypoint DAG in dependency order (one at a time; Argo would run independent
  tasks in parallel, ours never are, apart from the two mutually exclusive push tasks);
* ``depends`` with Argo's rule that a bare ``a`` means ``a.Succeeded || a.Skipped || a.Daemoned``;
  a task whose ``depends`` is false is *Omitted*; ``{{...}}`` substitution, then ``when``; a task
  whose ``when`` is false is *Skipped* (the expressions: ``local_runner.expressions``, no ``eval``);
* each template's container ``command`` + ``args`` run as a subprocess (``python`` is this
  interpreter - the pipeline image's Python), with its literal ``env``, ``ARGO_PROGRESS_FILE``
  pointing at ``<workdir>/progress/<task>`` (shown live), ``activeDeadlineSeconds`` as a timeout
  and ``retryStrategy.limit`` honoured (exit code 2, bad input, is never retried, like the
  rendered ``expression``; the backoff is shortened to seconds on one machine);
* output parameters read from each template's ``valueFrom.path`` after the task succeeds; a missing
  file fails the task, as Argo does;
* ``spec.arguments`` as workflow parameters (``{{workflow.parameters.X}}``, overridable with
  ``parameters=``, like ``argo submit -p``);
* ``onExit``: after the DAG ends, however it ends, its template runs with ``{{workflow.status}}``
  set (``Succeeded`` or ``Failed``), as Argo's exit handler does. (The Workflows kaiflow builds for
  ``provider=local`` have none: the local provider makes no nodes to release.)

State lives in ``<workdir>/state.json`` after every task: ``resume=True`` keeps the tasks that
finished (Succeeded, Skipped, Omitted) with their outputs and restarts at the first unfinished
one. The state records a digest of the manifest, so resuming after the Workspace changed is
refused rather than mixing outputs of two different pipelines.

One runner per workdir, and no task left running behind a dead runner: ``local_runner.supervise``
(the workdir lock, SIGTERM handled like Ctrl-C, task process groups recorded and ended on the
next run). Terminal output lives in ``local_runner.progress`` and ``local_runner.console``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from local_runner.expressions import ExpressionError, evaluate_depends, evaluate_when, substitute
from local_runner.progress import ProgressDisplay
from local_runner.supervise import (
    WorkdirInUse,
    WorkdirLock,
    end_group,
    end_leftovers,
    start_task,
    task_ended,
    terminate_as_interrupt,
)
from pipelines.structure import check, task_dependencies, topological_order, workflow_spec
from pipelines.target import TRAINING_CONFIG_KEY, Target

STATE_FILE = "state.json"
LOG_TAIL_LINES = 25
FINISHED = {"Succeeded", "Skipped", "Omitted"}
LOCAL_BACKOFF_CAP_S = 5.0
POLL_S = 0.25


class RunnerError(Exception):
    """The pipeline cannot run here (bad state, unsupported construct, workdir in use); one clear line."""


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
    exit_tasks: dict[str, TaskRecord] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return list(self.tasks)

    def output(self, task: str, name: str) -> str:
        return self.tasks[task].outputs[name]


def _evaluated(evaluate: Callable[..., Any], *args: Any) -> Any:
    try:
        return evaluate(*args)
    except ExpressionError as exc:
        raise RunnerError(str(exc)) from None


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
    """One execution of a manifest in a workdir; ``run()`` below is the usual entry point.

    ``parameters`` override the values of ``spec.arguments.parameters`` (``argo submit -p``).
    """

    def __init__(self, manifest: dict[str, Any], workdir: Path, *, resume: bool = False,
                 on_update: Callable[[LocalRun], None] | None = None, env: dict[str, str] | None = None,
                 parameters: dict[str, str] | None = None):
        check(manifest)
        self.manifest = manifest
        self.workdir = Path(workdir)
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
        unknown = sorted(set(parameters or {}) - set(self.workflow_params))
        if unknown:
            raise RunnerError(f"unknown workflow parameter(s) {', '.join(unknown)}; "
                              f"this Workflow has: {', '.join(sorted(self.workflow_params)) or 'none'}")
        self.workflow_params |= {k: str(v) for k, v in (parameters or {}).items()}
        self.on_update = on_update or (lambda _run: None)
        self.env = env
        self.records = {name: TaskRecord(name=name, template=self.tasks[name]["template"]) for name in self.order}
        self.exit_tasks, self.exit_records = self._exit_handler()
        self.state_path = self.workdir / STATE_FILE
        self.digest = _digest(manifest)
        self.resume = resume
        self.leftovers: list[str] = []
        self.status = "Running"
        if resume:  # refuse a changed pipeline at once; execute() reads the state again under the lock
            self._load_state()

    def _exit_handler(self) -> tuple[dict[str, dict[str, Any]], dict[str, TaskRecord]]:
        name = self.spec.get("onExit")
        if not name:
            return {}, {}
        template = self.templates[name]
        if "dag" in template:
            tasks = {t["name"]: t for t in template["dag"]["tasks"]}
            order = topological_order(template["dag"]["tasks"])
        else:  # a container template as the handler: one task named after it
            tasks, order = {name: {"name": name, "template": name}}, [name]
        clash = sorted(set(order) & set(self.tasks))
        if clash:
            raise RunnerError(f"onExit task name(s) {', '.join(clash)} also name tasks of the main DAG")
        return tasks, {n: TaskRecord(name=n, template=tasks[n]["template"]) for n in order}

    # state ---------------------------------------------------------------------------------

    def _load_state(self) -> None:
        if not self.state_path.exists():
            raise RunnerError(f"nothing to resume: {self.state_path} does not exist")
        state = json.loads(self.state_path.read_text())
        if state.get("digest") != self.digest:
            raise RunnerError("the pipeline changed since the last run in this workdir (Workspace edited?); "
                              "run without --resume or use another --workdir")
        if state.get("parameters", self.workflow_params) != self.workflow_params:
            raise RunnerError("the workflow parameters changed since the last run in this workdir; "
                              "run without --resume or use another --workdir")
        for name, data in state["tasks"].items():
            if name in self.records and data["status"] in FINISHED:
                self.records[name] = TaskRecord(**data)

    def save_state(self) -> None:
        state = {"digest": self.digest, "parameters": self.workflow_params, "status": self.status,
                 "tasks": {n: asdict(r) for n, r in self.records.items()},
                 "exit_tasks": {n: asdict(r) for n, r in self.exit_records.items()}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    # execution -----------------------------------------------------------------------------

    def statuses(self, records: dict[str, TaskRecord] | None = None) -> dict[str, str]:
        return {n: r.status for n, r in (self.records if records is None else records).items()}

    def scope(self, records: dict[str, TaskRecord] | None = None) -> dict[str, str]:
        scope = {"workflow.name": self.workflow_name,
                 "workflow.namespace": self.manifest["metadata"].get("namespace", "default"),
                 "workflow.status": self.status}
        scope |= {f"workflow.parameters.{k}": v for k, v in self.workflow_params.items()}
        for name, record in (self.records if records is None else records).items():
            scope |= {f"tasks.{name}.outputs.parameters.{k}": v for k, v in record.outputs.items()}
        return scope

    def execute(self) -> RunResult:
        """Run the DAG, then the exit handler; raise ``RunFailed`` for the first failed task.

        Holds the workdir lock throughout (``RunnerError`` "workdir in use" if another runner
        has it) and first ends the tasks a killed runner left behind.
        """
        try:
            lock = WorkdirLock(self.workdir).__enter__()
        except WorkdirInUse as exc:
            raise RunnerError(str(exc)) from None
        try:
            with terminate_as_interrupt():
                self.leftovers = end_leftovers(self.workdir)
                if self.resume:
                    self._load_state()
                for sub in ("logs", "progress", "outputs"):
                    (self.workdir / sub).mkdir(parents=True, exist_ok=True)
                try:
                    for name in self.order:
                        record = self.records[name]
                        if record.status in FINISHED:
                            continue
                        self._run_task(name, record, self.tasks[name], self.records)
                        self.save_state()
                        self.on_update(self)
                except RunFailed:
                    self.status = "Failed"
                    self._run_exit_handler()
                    raise
                except KeyboardInterrupt:
                    self.status = "Failed"
                    self.save_state()
                    raise
                self.status = "Succeeded"
                self._run_exit_handler()
                return RunResult(self.workdir, self.manifest, self.records, self.exit_records)
        finally:
            lock.__exit__(None, None, None)

    def _run_exit_handler(self) -> None:
        if not self.exit_records:
            self.save_state()
            return
        records = {n: TaskRecord(name=n, template=r.template) for n, r in self.exit_records.items()}
        self.exit_records = records
        try:
            for name, record in records.items():
                # the handler's tasks see the main DAG's outputs too, and each other's
                self._run_task(name, record, self.exit_tasks[name], records, outer=self.records)
                self.on_update(self)
        finally:
            self.save_state()

    def _run_task(self, name: str, record: TaskRecord, task: dict[str, Any], records: dict[str, TaskRecord],
                  outer: dict[str, TaskRecord] | None = None) -> None:
        template = self.templates[task["template"]]
        where = f"task {name}"
        deps = task_dependencies(task)
        depends = task.get("depends") or " && ".join(deps)
        if depends and not _evaluated(evaluate_depends, depends, self.statuses(records)):
            record.status, record.message = "Omitted", f"depends {depends!r} is false"
            return
        scope = (self.scope(outer) if outer is not None else {}) | self.scope(records)
        arguments = {p["name"]: _evaluated(substitute, str(p.get("value", "")), scope, where)
                     for p in (task.get("arguments") or {}).get("parameters") or []}
        record.arguments = arguments
        if "when" in task:
            condition = _evaluated(substitute, task["when"], scope, where)
            if not _evaluated(evaluate_when, condition):
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
            inputs[f"inputs.parameters.{param['name']}"] = _evaluated(substitute, str(value), scope, where)
        local_scope = scope | inputs | {"pod.name": name}

        def fill(value: Any) -> str:
            return _evaluated(substitute, str(value), local_scope, where)

        command = [fill(c) for c in container.get("command") or []]
        command += [fill(a) for a in container.get("args") or []]
        if command and command[0] in {"python", "python3"}:
            command[0] = sys.executable  # the pipeline image's Python is this interpreter here
        record.command = command
        progress_file = self.workdir / "progress" / name
        progress_file.unlink(missing_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_steps_root(), env.get("PYTHONPATH")) if p)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = fill(var["value"])
        env["ARGO_PROGRESS_FILE"] = str(progress_file)
        log_path = self.workdir / "logs" / f"{name}.log"
        deadline = template.get("activeDeadlineSeconds")
        limit, no_retry = _retry_limit(template), _no_retry_codes(template)

        record.status, record.started, record.finished = "Running", time.time(), None
        record.attempts, record.exit_code, record.outputs = 0, None, {}
        self.save_state()  # a runner killed during this task leaves a state to --resume from
        with open(log_path, "w") as log:
            while True:
                record.attempts += 1
                log.write(f"# attempt {record.attempts}: {' '.join(command)}\n")
                log.flush()
                try:
                    code, reason = self._spawn(name, command, env, log, progress_file, record, deadline)
                except KeyboardInterrupt:
                    record.status, record.message, record.finished = "Failed", "interrupted", time.time()
                    raise
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
            path = Path(fill(param["valueFrom"]["path"]))
            try:
                outputs[param["name"]] = path.read_text().strip()
            except OSError:
                if "default" in param["valueFrom"]:  # Argo's valueFrom.default: the file may be absent
                    outputs[param["name"]] = fill(param["valueFrom"]["default"])
                    continue
                record.status = "Failed"
                record.message = f"output parameter {param['name']!r} was not written to {path}"
                self.save_state()
                raise RunFailed(name, code, log_path, _tail(log_path), record.message) from None
        record.outputs = outputs
        for artifact in (template.get("outputs") or {}).get("artifacts") or []:
            path = Path(fill(artifact["path"]))
            if path.exists():
                record.artifacts[artifact["name"]] = str(path)
            elif not artifact.get("optional"):
                record.status, record.message = "Failed", f"output artifact {artifact['name']!r} missing at {path}"
                self.save_state()
                raise RunFailed(name, code, log_path, _tail(log_path), record.message)
        record.status = "Succeeded"

    def _spawn(self, name: str, command: list[str], env: dict[str, str], log: Any, progress_file: Path,
               record: TaskRecord, deadline: int | None) -> tuple[int | None, str]:
        process = start_task(self.workdir, name, command, env=env, log=log, cwd=self.workdir)
        started = time.monotonic()
        try:
            while process.poll() is None:
                if deadline and time.monotonic() - started > deadline:
                    end_group(process)
                    return None, f"exceeded activeDeadlineSeconds={deadline}"
                try:
                    record.progress = progress_file.read_text().strip()
                except OSError:
                    pass
                self.on_update(self)
                time.sleep(POLL_S)
        except BaseException:  # Ctrl-C or SIGTERM: the task runs in its own session, so end it here
            end_group(process)
            raise
        finally:
            if process.returncode is not None:
                task_ended(self.workdir, name)
        try:
            record.progress = progress_file.read_text().strip()
        except OSError:
            pass
        return process.returncode, ""


# -- public entry point -------------------------------------------------------------------------


def local_manifest(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                   port: int | None = None, docker_config: str | os.PathLike[str] | None = None,
                   namespace: str | None = None, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The manifest ``run`` executes: the Workspace's Workflow built for ``Target.local``
    (``kaiflow render --target local`` prints it). ``namespace``: ``-n``, for a Workspace naming none;
    ``base_dir``: where relative ``file:`` URLs and ``tuning.config`` resolve (default: the file's folder)."""
    from api.workspace_validation import load_bundle
    from pipelines.dags import build

    bundle = load_bundle(workspace_path, mode="local", namespace=namespace)
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
    target = Target.local(workdir, base_dir=base_dir or Path(workspace_path).resolve().parent, port=port,
                          docker_config_file=docker_config)
    return build(workspace, target, service_env).to_dict()


def run(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], resume: bool = False, *,
        port: int | None = None, docker_config: str | os.PathLike[str] | None = None,
        console: Any = None, env: dict[str, str] | None = None,
        parameters: dict[str, str] | None = None, namespace: str | None = None,
        preflight: bool = False, base_dir: str | os.PathLike[str] | None = None) -> RunResult:
    """Run a Workspace's DAG on this machine; raise ``RunFailed`` at the first failing task.

    ``port`` is where a local deploy serves (a free one is picked, and kept for ``resume``);
    ``docker_config`` is the docker config file used in place of imagePushSecret/imagePullSecrets;
    ``parameters`` override the Workflow's arguments (``argo submit -p name=value``);
    ``preflight``: check what the DAG needs outside itself first (``local_runner.preflight``; a
    local default registry it starts is stopped when the run ends), ``PreflightError`` if missing.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        lock = WorkdirLock(workdir).__enter__()
    except WorkdirInUse as exc:
        raise RunnerError(str(exc)) from None
    checked = None
    try:
        settings_path = workdir / "run.json"
        if resume and settings_path.exists():
            settings = json.loads(settings_path.read_text())
            port = port or settings.get("port")
            docker_config = docker_config or settings.get("docker_config")
        port = port or _free_port()
        manifest = local_manifest(workspace_path, workdir, port=port, docker_config=docker_config, namespace=namespace,
                                  base_dir=base_dir)
        if preflight:
            from local_runner.preflight import check as check_needs

            checked = check_needs(manifest, workdir, parameters)
        settings_path.write_text(json.dumps({"port": port, "docker_config": str(docker_config) if docker_config else None,
                                             "workspace": str(Path(workspace_path).resolve())}))

        with ProgressDisplay(console=console) as display:
            local = LocalRun(manifest, workdir, resume=resume, on_update=display.update, env=env,
                             parameters=parameters)
            display.update(local)
            try:
                return local.execute()
            finally:
                display.update(local)
                if local.leftovers:
                    display.console.print("ended tasks a previous run left running: " + "; ".join(local.leftovers),
                                          highlight=False)
    finally:
        if checked is not None:
            checked.stop()
        lock.__exit__(None, None, None)


def __getattr__(name: str) -> Any:
    # ``run_cli`` (terminal output) lives in local_runner.console, which imports this module
    if name == "run_cli":
        from local_runner.console import run_cli

        return run_cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
