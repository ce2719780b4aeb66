"""Process supervision of a local run: one runner per workdir, no task outliving its runner unseen.

Three hazards of ``kaiflow run`` that Argo does not have, because there a pod is a pod:

* **Two runners on one workdir** would run side by side and write the same files (for ``tune``:
  two trainers on one checkpoint folder). ``WorkdirLock`` takes ``fcntl.flock`` on
  ``<workdir>/.lock`` for the whole run; a second runner fails at once with ``WorkdirInUse``
  (``kaiflow run`` exits 2 with "workdir in use"). The kernel drops the lock when the runner dies,
  however it dies, so a stale lock never needs cleaning up.
* **Tasks outliving their runner.** Each task runs in its own session (so Ctrl-C in the terminal
  reaches the runner, which then ends the task's whole process group). ``SIGTERM`` is handled
  like Ctrl-C (``terminate_as_interrupt``). After ``SIGKILL`` nothing can be handled, so every
  running task is recorded in ``<workdir>/processes/<task>.json`` (process group and start time)
  while it runs; the next runner on that workdir ends whatever is left of those groups
  (``end_leftovers``) before it starts anything.
* **PID reuse.** A recorded group is ended only for processes that are still in that group and
  started no earlier than the recorded task did, so an unrelated process that got a reused
  number is left alone.

Services a task deliberately detaches (``deploy --mode local`` starts ``bentoml serve`` in a
session of its own and records it under ``<workdir>/serve``) are not task processes: they
survive the runner by design and ``kaiflow stop`` ends them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil

LOCK_FILE = ".lock"
PROCESSES_DIR = "processes"
TERMINATE_GRACE_S = 5.0


class WorkdirInUse(RuntimeError):
    """Another runner holds the workdir."""


class WorkdirLock:
    """``fcntl.flock`` on ``<workdir>/.lock``, re-entrant within one thread (``run`` holds it
    around ``LocalRun.execute``, which takes it too); another thread is refused like another process.
    """

    _held: dict[Path, tuple[TextIO, int, int]] = {}
    _guard = threading.Lock()

    def __init__(self, workdir: Path):
        self.path = Path(workdir).resolve() / LOCK_FILE

    def __enter__(self) -> WorkdirLock:
        with self._guard:
            if self.path in self._held:
                handle, count, owner = self._held[self.path]
                if owner != threading.get_ident():
                    raise WorkdirInUse(f"workdir in use: {self.path.parent} is being run by another thread "
                                       "of this process; use another workdir")
                self._held[self.path] = (handle, count + 1, owner)
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the whole run
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise WorkdirInUse(
                    f"workdir in use: {self.path.parent} is being run by another kaiflow run"
                    + (f" (pid {holder})" if holder else "") + "; wait for it, or stop it, or use another --workdir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self._held[self.path] = (handle, 1, threading.get_ident())
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._guard:
            handle, count, owner = self._held[self.path]
            if count > 1:
                self._held[self.path] = (handle, count - 1, owner)
                return
            del self._held[self.path]
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class TaskProcess:
    task: str
    pgid: int
    started: float  # the group leader's start time (seconds since the epoch), from the kernel
    runner_pid: int


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def start_task(workdir: Path, task: str, command: list[str], *, env: dict[str, str], log: TextIO,
               cwd: Path) -> subprocess.Popen[bytes]:
    """Start a task in its own session and record its process group until ``task_ended``."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, cwd=cwd, start_new_session=True)
    record = TaskProcess(task=task, pgid=process.pid, started=_start_time(process.pid) or time.time(),
                         runner_pid=os.getpid())
    folder = Path(workdir) / PROCESSES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{task}.json.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(folder / f"{task}.json")
    return process


def task_ended(workdir: Path, task: str) -> None:
    (Path(workdir) / PROCESSES_DIR / f"{task}.json").unlink(missing_ok=True)


def end_group(process: subprocess.Popen[bytes], grace_s: float = TERMINATE_GRACE_S) -> None:
    """End a task and whatever it started in its group: SIGTERM, then SIGKILL after ``grace_s``."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_members(record: TaskProcess) -> list[Any]:
    members = []
    for process in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(process.pid) != record.pgid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        created = process.info.get("create_time")
        # a process in that group that started before the task did is not the task's (reused number)
        if created is not None and created + 0.01 >= record.started:
            members.append(process)
    return members


def end_leftovers(workdir: Path, grace_s: float = TERMINATE_GRACE_S) -> list[str]:
    """End the processes of tasks a previous runner left running; return what was ended.

    Call it with the workdir lock held: then no live runner owns those tasks.
    """

    folder = Path(workdir) / PROCESSES_DIR
    ended = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = TaskProcess(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        members = _group_members(record)
        if members:
            for process in members:
                with contextlib.suppress(psutil.Error):
                    process.terminate()
            _, alive = psutil.wait_procs(members, timeout=grace_s)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(alive, timeout=grace_s)
            ended.append(f"{record.task} (process group {record.pgid}, {len(members)} process(es))")
        path.unlink(missing_ok=True)
    return ended
