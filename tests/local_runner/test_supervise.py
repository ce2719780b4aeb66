"""Issue 11, local runs: one runner per workdir, SIGTERM like Ctrl-C, no task left behind a killed
runner. Real processes: a runner in a subprocess over a tiny Hera-built DAG whose task sleeps."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hera.workflows import DAG, Container, Parameter, Workflow
from hera.workflows import models as m
from rich.console import Console

from local_runner.console import run_cli
from local_runner.runner import LocalRun, RunFailed, RunnerError

ROOT = Path(__file__).resolve().parents[2]
# Starts: append our pid to pids.txt; the first start sleeps (a long task), later ones finish at once.
SLEEPER = (
    "import os, pathlib, sys, time; w = pathlib.Path(sys.argv[1]); p = w / 'pids.txt'; "
    "first = not p.exists(); p.write_text((p.read_text() if p.exists() else '') + f'{os.getpid()}\\n'); "
    "time.sleep(120 if first else 0); o = w / 'outputs' / 'sleeper'; o.mkdir(parents=True, exist_ok=True); "
    "(o / 'done').write_text('yes')"
)
RUNNER = (
    "import json, sys; from pathlib import Path; from local_runner.runner import LocalRun; "
    "LocalRun(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), resume=sys.argv[3] == '1').execute()"
)


def _sleeper_workflow(workdir: Path) -> dict:
    with Workflow(generate_name="sleepy-", entrypoint="main") as w:
        sleeper = Container(
            name="sleeper", image="unused", command=["python", "-c", SLEEPER], args=[str(workdir)],
            outputs=[Parameter(name="done", value_from=m.ValueFrom(path=f"{workdir}/outputs/{{{{pod.name}}}}/done"))],
        )
        with DAG(name="main"):
            sleeper(name="sleeper")
    return w.to_dict()


def _start_runner(tmp_path: Path, workdir: Path, resume: bool = False) -> subprocess.Popen:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(_sleeper_workflow(workdir)))
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(manifest), str(workdir), "1" if resume else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _pids(workdir: Path) -> list[int]:
    path = workdir / "pids.txt"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def running(tmp_path: Path):
    """A runner in a subprocess, its task sleeping; ended (with its task) at the end of the test."""
    workdir = tmp_path / "work"
    runner = _start_runner(tmp_path, workdir)
    _wait_for(lambda: _pids(workdir), what="the task to start")
    yield runner, workdir
    for pid in [runner.pid, *_pids(workdir)]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    runner.wait(timeout=10)


@pytest.mark.timeout(150)
def test_second_run_on_a_workdir_in_use_is_refused(running, tmp_path: Path):
    runner, workdir = running
    with pytest.raises(RunnerError, match="workdir in use"):
        LocalRun(_sleeper_workflow(workdir), workdir).execute()
    out = io.StringIO()
    code = run_cli(ROOT / "examples" / "local_tuning_tiny.yaml", workdir, console=Console(file=out, width=200))
    assert code == 2 and "workdir in use" in out.getvalue()
    assert _pids(workdir)[:1] and len(_pids(workdir)) == 1  # the refused runs started nothing
    assert runner.poll() is None


@pytest.mark.timeout(150)
def test_sigterm_ends_the_runner_and_its_task(running):
    runner, workdir = running
    task = _pids(workdir)[0]
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=20)
    _wait_for(lambda: not _alive(task), timeout=10, what="the task to end")
    state = json.loads((workdir / "state.json").read_text())
    assert state["tasks"]["sleeper"]["status"] == "Failed"
    assert state["tasks"]["sleeper"]["message"] == "interrupted"
    assert not list((workdir / "processes").glob("*.json"))


@pytest.mark.timeout(180)
def test_resume_after_sigkill_ends_the_orphaned_task_before_running_it_again(running, tmp_path: Path):
    runner, workdir = running
    orphan = _pids(workdir)[0]
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=10)
    time.sleep(0.5)
    assert _alive(orphan), "the task has its own session: it outlives a killed runner"
    assert (workdir / "processes" / "sleeper.json").exists()

    local = LocalRun(_sleeper_workflow(workdir), workdir, resume=True)
    result = local.execute()
    assert not _alive(orphan)
    assert local.leftovers and local.leftovers[0].startswith("sleeper")
    assert result.output("sleeper", "done") == "yes"
    assert len(_pids(workdir)) == 2  # the orphan, then exactly one new copy
    assert not list((workdir / "processes").glob("*.json"))


@pytest.mark.timeout(150)
def test_a_recorded_group_that_is_gone_or_reused_is_left_alone(tmp_path: Path):
    workdir = tmp_path / "work"
    (workdir / "processes").mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        # a record naming the bystander's group but a later start time: its number was reused
        record = {"task": "sleeper", "pgid": bystander.pid, "started": time.time() + 3600, "runner_pid": 1}
        (workdir / "processes" / "sleeper.json").write_text(json.dumps(record))
        (workdir / "pids.txt").write_text("0\n")  # so the task finishes at once
        LocalRun(_sleeper_workflow(workdir), workdir).execute()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _exit_handler_workflow(workdir: Path, fail: bool) -> dict:
    note = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text((p.read_text() if p.exists() else '') + sys.argv[2] + '\\n')"
    with Workflow(generate_name="exit-", entrypoint="main", on_exit="on-exit",
                  arguments=[Parameter(name="release", value="on-failure")]) as w:
        work = Container(name="work", image="unused", command=["python", "-c", f"import sys; sys.exit({int(fail)})"])
        release = Container(name="release", image="unused", command=["python", "-c", note],
                             args=[str(workdir / "notes.txt"), "released after {{workflow.status}}"])
        with DAG(name="main"):
            work(name="work")
        with DAG(name="on-exit"):
            release(name="release-nodes",
                    when="{{workflow.parameters.release}} == always || "
                         "({{workflow.parameters.release}} == on-failure && {{workflow.status}} != Succeeded)")
    return w.to_dict()


def test_exit_handler_runs_after_a_failure_with_the_workflow_status(tmp_path: Path):
    with pytest.raises(RunFailed):
        LocalRun(_exit_handler_workflow(tmp_path, fail=True), tmp_path).execute()
    assert (tmp_path / "notes.txt").read_text() == "released after Failed\n"


def test_exit_handler_when_and_workflow_parameters(tmp_path: Path):
    result = LocalRun(_exit_handler_workflow(tmp_path, fail=False), tmp_path).execute()
    assert result.exit_tasks["release-nodes"].status == "Skipped"
    assert not (tmp_path / "notes.txt").exists()
    result = LocalRun(_exit_handler_workflow(tmp_path, fail=False), tmp_path, parameters={"release": "always"}).execute()
    assert result.exit_tasks["release-nodes"].status == "Succeeded"
    assert (tmp_path / "notes.txt").read_text() == "released after Succeeded\n"
    with pytest.raises(RunnerError, match="unknown workflow parameter"):
        LocalRun(_exit_handler_workflow(tmp_path, fail=False), tmp_path, parameters={"relase": "always"})


def test_the_lock_is_reentrant_in_one_thread_and_refused_to_another(tmp_path: Path):
    import threading

    from local_runner.supervise import WorkdirInUse, WorkdirLock

    refused = []

    def other_thread():
        try:
            with WorkdirLock(tmp_path):
                pass
        except WorkdirInUse as exc:
            refused.append(str(exc))

    with WorkdirLock(tmp_path), WorkdirLock(tmp_path):  # run() around LocalRun.execute()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=10)
    assert refused and "workdir in use" in refused[0]
    with WorkdirLock(tmp_path):  # released by the outer exit
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
