"""The local runner's reading of Argo semantics, on small Hera-built workflows.

The tasks are tiny Python commands (no steps, no model) so that each rule - order, parameter
passing, when/depends, retries, deadlines, failure report, resume - is shown in a second. The
end-to-end run of a real Workspace is in test_run_example.py.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from hera.workflows import DAG, Container, Parameter, RetryStrategy, Workflow
from hera.workflows import models as m
from rich.console import Console

from local_runner.progress import ProgressDisplay
from local_runner.expressions import ExpressionError, evaluate_depends, evaluate_when
from local_runner.runner import LocalRun, RunFailed, RunnerError

WRITE_OUTPUT = (
    "import os, sys, pathlib; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
    "(d / sys.argv[2]).write_text(sys.argv[3]); "
    "log = pathlib.Path(os.environ['RUNLOG']); log.write_text(log.read_text() + os.environ['TASK'] + '\\n' if log.exists() else os.environ['TASK'] + '\\n')"
)


def _emit(workdir: Path, name: str, output: str, value: str, **kwargs) -> Container:
    outputs = f"{workdir}/outputs/{{{{pod.name}}}}"
    return Container(
        name=name, image="unused", command=["python", "-c", WRITE_OUTPUT],
        args=[outputs, output, value],
        env=[m.EnvVar(name="TASK", value=name), m.EnvVar(name="RUNLOG", value=str(workdir / "ran.txt"))],
        outputs=[Parameter(name=output, value_from=m.ValueFrom(path=f"{outputs}/{output}"))], **kwargs,
    )


def _gate_workflow(workdir: Path, promote: str) -> dict:
    with Workflow(generate_name="gate-", entrypoint="main") as w:
        gate = _emit(workdir, "gate", "promote", promote)
        push = _emit(workdir, "push", "image", "{{inputs.parameters.digest}}:pushed",
                     inputs=[Parameter(name="digest")])
        deploy = _emit(workdir, "deploy", "url", "{{inputs.parameters.image}}/served", inputs=[Parameter(name="image")])
        with DAG(name="main"):
            g = gate(name="gate")
            p = push(name="push", arguments={"digest": "sha256:abc"},
                     when="{{tasks.gate.outputs.parameters.promote}} == true")
            g >> p
            deploy(name="deploy", depends="push.Succeeded",
                   arguments={"image": "{{tasks.push.outputs.parameters.image}}"})
    return w.to_dict()


def _ran(workdir: Path) -> list[str]:
    path = workdir / "ran.txt"
    return path.read_text().split() if path.exists() else []


def test_outputs_flow_between_tasks_in_dependency_order(tmp_path: Path):
    result = LocalRun(_gate_workflow(tmp_path, "true"), tmp_path).execute()
    assert _ran(tmp_path) == ["gate", "push", "deploy"]
    assert result.output("push", "image") == "sha256:abc:pushed"
    assert result.output("deploy", "url") == "sha256:abc:pushed/served"
    assert result.tasks["deploy"].arguments == {"image": "sha256:abc:pushed"}
    assert result.tasks["push"].command[0] == sys.executable  # the image's python is this interpreter


def test_false_when_skips_and_depends_on_succeeded_omits(tmp_path: Path):
    result = LocalRun(_gate_workflow(tmp_path, "false"), tmp_path).execute()
    assert _ran(tmp_path) == ["gate"]
    assert result.tasks["push"].status == "Skipped"
    assert result.tasks["deploy"].status == "Omitted"


def _failing_workflow(workdir: Path, *, code: int, retries: int = 0, marker: Path | None = None,
                      deadline: int | None = None, sleep: float = 0) -> dict:
    # fails with `code` until `marker` exists; counts its attempts in attempts.txt
    script = (
        "import pathlib, sys, time; c = pathlib.Path(sys.argv[1]); "
        "c.write_text(str(int(c.read_text()) + 1) if c.exists() else '1'); time.sleep(float(sys.argv[4])); "
        "ok = sys.argv[2] and pathlib.Path(sys.argv[2]).exists(); "
        "print('flaky: remote said 503', file=sys.stderr) if not ok else None; sys.exit(0 if ok else int(sys.argv[3]))"
    )
    with Workflow(generate_name="fail-", entrypoint="main") as w:
        first = _emit(workdir, "first", "x", "1")
        flaky = Container(
            name="flaky", image="unused", command=["python", "-c", script],
            args=[str(workdir / "attempts.txt"), str(marker or ""), str(code), str(sleep)],
            retry_strategy=RetryStrategy(limit=retries, expression="asInt(lastRetry.exitCode) != 2",
                                         backoff=m.Backoff(duration="30s", factor=1)) if retries else None,
            active_deadline_seconds=deadline,
        )
        last = _emit(workdir, "last", "y", "2")
        with DAG(name="main"):
            first(name="first") >> flaky(name="flaky") >> last(name="last")
    return w.to_dict()


def test_stops_at_first_failure_with_task_exit_code_and_log_tail(tmp_path: Path):
    with pytest.raises(RunFailed) as excinfo:
        LocalRun(_failing_workflow(tmp_path, code=3), tmp_path).execute()
    failure = excinfo.value
    assert (failure.task, failure.exit_code) == ("flaky", 3)
    assert "flaky: remote said 503" in failure.log_tail
    assert failure.log_path == tmp_path / "logs" / "flaky.log"
    assert _ran(tmp_path) == ["first"]


def test_resume_restarts_at_the_first_unfinished_task(tmp_path: Path):
    marker = tmp_path / "fixed"
    manifest = _failing_workflow(tmp_path, code=1, marker=marker)
    with pytest.raises(RunFailed):
        LocalRun(manifest, tmp_path).execute()
    marker.touch()
    result = LocalRun(manifest, tmp_path, resume=True).execute()
    assert _ran(tmp_path) == ["first", "last"]  # `first` was not run again
    assert [r.status for r in result.tasks.values()] == ["Succeeded"] * 3
    assert result.output("first", "x") == "1"  # kept from the first run's state


def test_resume_refuses_a_changed_pipeline(tmp_path: Path):
    with pytest.raises(RunFailed):
        LocalRun(_failing_workflow(tmp_path, code=1), tmp_path).execute()
    with pytest.raises(RunnerError, match="changed since the last run"):
        LocalRun(_failing_workflow(tmp_path, code=4), tmp_path, resume=True)


def test_retry_strategy_limit_is_honoured_but_exit_code_2_is_not_retried(tmp_path: Path):
    with pytest.raises(RunFailed):
        LocalRun(_failing_workflow(tmp_path, code=1, retries=2), tmp_path).execute()
    assert (tmp_path / "attempts.txt").read_text() == "3"
    (tmp_path / "attempts.txt").unlink()
    with pytest.raises(RunFailed) as excinfo:
        LocalRun(_failing_workflow(tmp_path, code=2, retries=2), tmp_path).execute()
    assert excinfo.value.exit_code == 2
    assert (tmp_path / "attempts.txt").read_text() == "1"


def test_active_deadline_kills_the_task(tmp_path: Path):
    with pytest.raises(RunFailed) as excinfo:
        LocalRun(_failing_workflow(tmp_path, code=0, deadline=1, sleep=30), tmp_path).execute()
    assert "activeDeadlineSeconds=1" in excinfo.value.reason


def test_missing_output_parameter_fails_the_task_like_argo(tmp_path: Path):
    with Workflow(generate_name="out-", entrypoint="main") as w:
        silent = Container(name="silent", image="unused", command=["python", "-c", "pass"],
                           outputs=[Parameter(name="digest", value_from=m.ValueFrom(path=str(tmp_path / "nothing")))])
        with DAG(name="main"):
            silent(name="silent")
    with pytest.raises(RunFailed, match="output parameter 'digest' was not written"):
        LocalRun(w.to_dict(), tmp_path).execute()


def test_progress_file_is_read_and_displayed(tmp_path: Path):
    script = "import os, pathlib; pathlib.Path(os.environ['ARGO_PROGRESS_FILE']).write_text('37/120\\n')"
    with Workflow(generate_name="progress-", entrypoint="main") as w:
        step = Container(name="long", image="unused", command=["python", "-c", script])
        with DAG(name="main"):
            step(name="long-step")
    out = io.StringIO()
    with ProgressDisplay(console=Console(file=out, width=100)) as display:
        result = LocalRun(w.to_dict(), tmp_path, on_update=display.update).execute()
    assert result.tasks["long-step"].progress == "37/120"
    assert "37/120" in out.getvalue() and "Succeeded" in out.getvalue()


def test_depends_follows_argo_rules():
    statuses = {"a": "Succeeded", "b": "Skipped", "c": "Failed", "d": "Omitted"}
    assert evaluate_depends("a && b", statuses)  # a bare name accepts Skipped
    assert not evaluate_depends("b.Succeeded", statuses)
    assert evaluate_depends("c.Failed || d", statuses)
    assert not evaluate_depends("d", statuses)
    assert evaluate_depends("!(c.Succeeded) && (a.Succeeded || d.Succeeded)", statuses)


def test_when_evaluates_the_forms_we_generate():
    assert evaluate_when("true == true")
    assert not evaluate_when("false == true")
    assert evaluate_when("false != true")
    assert evaluate_when("'a' == a")
    assert evaluate_when("1 < 2") and evaluate_when("10 > 9")  # numbers compare as numbers
    assert evaluate_when("Failed != Succeeded && (always == always || x == y)")
    assert not evaluate_when("!(true == true)")
    with pytest.raises(ExpressionError, match="not a condition"):
        evaluate_when("x")
    with pytest.raises(ExpressionError, match="unexpected"):
        evaluate_when("__import__('os').system('true') == 0")
    with pytest.raises(ExpressionError, match="missing"):
        evaluate_when("(true == true")
    with pytest.raises(ExpressionError, match="cannot read"):
        evaluate_when("a == 'unterminated")


def test_run_cli_reports_a_bad_workspace_field_without_traceback(tmp_path: Path):
    from local_runner.runner import run_cli

    workspace = tmp_path / "ws.yaml"
    workspace.write_text(
        "apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: vol}\n"
        "resource: {labelSelector: {matchLabels: {a: b}}}\n"
        "tuning:\n  preset: {name: kaiflow-tiny-test}\n  input: {urls: ['file:///nowhere.parquet']}\n"
        "  output: {volumeSource: {emptyDir: {}}}\n"
    )
    out = io.StringIO()
    assert run_cli(workspace, tmp_path / "work", console=Console(file=out, width=200)) == 2
    assert "tuning.output.volumeSource" in out.getvalue()
    assert "Traceback" not in out.getvalue()


def test_run_cli_names_the_failing_task(tmp_path: Path):
    from local_runner.runner import run_cli

    workspace = tmp_path / "ws.yaml"
    workspace.write_text(
        "apiVersion: kaito.sh/v1beta1\nkind: Workspace\nmetadata: {name: missing-data}\n"
        "resource: {labelSelector: {matchLabels: {a: b}}}\n"
        "tuning:\n  preset: {name: kaiflow-tiny-test}\n  input: {urls: ['file:no/such/file.parquet']}\n"
        "  output: {image: '127.0.0.1:1/x/y:v1'}\n"
    )
    out = io.StringIO()
    assert run_cli(workspace, tmp_path / "work", console=Console(file=out, width=200), preflight=False) == 1
    text = out.getvalue()
    assert "task fetch-dataset failed (exit code 2)" in text
    assert "no/such/file.parquet" in text
    assert "--resume" in text
