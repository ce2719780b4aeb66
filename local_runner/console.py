"""``kaiflow run`` on a terminal: run a Workspace locally, then print a summary or the failure."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.markup import escape

from local_runner.runner import RunFailed, RunnerError, run
from pipelines.names import OUTPUT_IMAGE, OUTPUT_SERVICE_URL, TASK_DEPLOY, TASK_PUSH_ADAPTER

# the exit code of a run ended by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)
INTERRUPTED = 130


def run_cli(workspace_path: str | os.PathLike[str], workdir: str | os.PathLike[str], resume: bool = False,
            console: Any = None, parameters: dict[str, str] | None = None, namespace: str | None = None,
            preflight: bool = True, base_dir: str | os.PathLike[str] | None = None) -> int:
    """Run, then print a summary or the failure; returns the exit code.

    0 all tasks finished; 1 a task failed (its name, exit code and log tail are printed, and
    ``--resume`` picks up from it); 2 the pipeline cannot run here (bad state, unsupported field,
    workdir in use by another run, something the DAG needs missing: ``local_runner.preflight``);
    130 interrupted (Ctrl-C or SIGTERM; the running task was ended).
    """

    from api import WorkspaceValidationError
    from local_runner.expressions import ExpressionError
    from local_runner.preflight import PreflightError
    from pipelines.dags import PipelineError
    from pipelines.structure import StructureError

    console = console or Console(stderr=True)
    try:
        result = run(workspace_path, workdir, resume=resume, console=console, parameters=parameters,
                     namespace=namespace, preflight=preflight, base_dir=base_dir)
    except RunFailed as exc:
        detail = "; ".join(d for d in (f"exit code {exc.exit_code}" if exc.exit_code else "", exc.reason) if d)
        console.print(f"[bold red]task {exc.task} failed[/] ({detail})", highlight=False)
        console.print(exc.log_tail, markup=False, highlight=False)
        console.print(f"full log: {exc.log_path}\nafter fixing it: kaiflow run {workspace_path} "
                      f"--workdir {workdir} --resume", highlight=False)
        return 1
    except (RunnerError, PipelineError, StructureError, ExpressionError, WorkspaceValidationError, PreflightError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # fixes to copy whole
        return 2
    except KeyboardInterrupt:
        console.print(f"interrupted; the running task was ended. Continue with: kaiflow run {workspace_path} "
                      f"--workdir {workdir} --resume", highlight=False)
        return INTERRUPTED
    for task, name in ((TASK_PUSH_ADAPTER, OUTPUT_IMAGE), (TASK_DEPLOY, OUTPUT_SERVICE_URL)):
        record = result.tasks.get(task)
        if record and name in record.outputs:
            console.print(f"{task}: {name} = {record.outputs[name]}", highlight=False)
    console.print(f"logs: {result.workdir / 'logs'}", highlight=False)
    return 0
