"""The local supervisor of ``bentoml serve``: start the chat service on this machine, find it, stop it.

``kaiflow run`` (through ``python -m steps.deploy --mode local``), ``kaiflow chat``/``kaiflow stop``
and the test fixtures use it. :func:`start_local` runs ``bentoml serve
serving_bento.service:KaiflowChat`` as a process group of its own (BentoML's supervisor keeps its
worker alive), waits for ``/readyz`` under a deadline and records ``<workdir>/service.json``
(url, pid, log path, ...). A service already running from the same workdir is replaced (a
scheduled run redeploys). The server outlives the process that started it; :func:`stop_local`
ends it, :func:`service_url` finds its URL. If the server exits or reports a failed model load
(``/livez`` 503) before it is ready, :func:`start_local` fails with the tail of its log.

Every failure is a ``StepError`` (exit 2 in a step): on one machine nothing gets better by retrying.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepkit.common import StepError
from steps.deploy.manifests import SERVICE_IMPORT

log = logging.getLogger("kaiflow.steps.deploy.local_service")

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_FILE = "service.json"
LOG_FILE = "service.log"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def service_env(model: str, adapters: list[dict[str, Any]], engine: str = "batching",
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KAIFLOW_MODEL": model,
        "KAIFLOW_ENGINE": engine,
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    if adapters:
        env["KAIFLOW_ADAPTERS"] = json.dumps(adapters)
    else:
        env.pop("KAIFLOW_ADAPTERS", None)
    env.update(extra or {})
    return env


@dataclass
class LocalService:
    url: str
    pid: int
    workdir: Path
    process: subprocess.Popen | None = None  # set only in the process that started it

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE


def listeners_on(port: int) -> int:
    """Listening TCP sockets on ``port`` (BentoML binds with SO_REUSEPORT, so two servers can share one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def start_local(model: str, workdir: str | os.PathLike[str], *, adapters: list[dict[str, Any]] | None = None,
                host: str = "127.0.0.1", port: int = 0, engine: str = "batching", ready_timeout: float = 600.0,
                extra_env: dict[str, str] | None = None, workspace_name: str = "") -> LocalService:
    """Start ``bentoml serve`` in its own process group and wait until /readyz answers 200.

    BentoML listens with SO_REUSEPORT: a second server that happens to start on the same port
    (another test session on a shared machine) would silently share its traffic. A port we picked
    ourselves is therefore checked to have exactly one listener, and picked again if not.
    """
    existing = read_service_file(workdir)
    if existing and pid_is_bento(existing.get("pid", -1)):
        # a new rollout replaces the old one, as a Deployment update does (scheduled runs redeploy)
        log.info("replacing the service running from %s (pid %s)", workdir, existing["pid"])
        stop_local(workdir)
    if port and listeners_on(port):
        raise StepError(f"--port {port}: another process already listens there")
    for _attempt in range(3):
        service = _start_local_once(model, workdir, adapters=adapters, host=host, port=port, engine=engine,
                                    ready_timeout=ready_timeout, extra_env=extra_env, workspace_name=workspace_name)
        bound = int(service.url.rsplit(":", 1)[1])
        if listeners_on(bound) <= 1:
            return service
        stop_local(workdir, service)
        if port:
            raise StepError(f"--port {port}: another server started listening there too")
        log.warning("another server also listens on port %d; starting again on another port", bound)
    raise StepError("could not get a port of our own for the service (3 tries)")


def _start_local_once(model: str, workdir: str | os.PathLike[str], *, adapters: list[dict[str, Any]] | None,
                      host: str, port: int, engine: str, ready_timeout: float, extra_env: dict[str, str] | None,
                      workspace_name: str) -> LocalService:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log_path = workdir / LOG_FILE
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]
    env = service_env(model, adapters or [], engine, extra_env)
    # Each `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts: services
    # sharing one home would wipe and mix each other's /metrics, so each gets its own.
    env["BENTOML_HOME"] = str(workdir / "bentoml")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    service = LocalService(url=url, pid=process.pid, workdir=workdir, process=process)
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            code = process.poll()
            if code is not None:
                raise StepError(f"the service exited with code {code} before it was ready; log tail:\n"
                                f"{log_tail(log_path)}")
            if _http_status(f"{url}/livez") == 503:
                raise StepError(f"the service failed to load its model; log tail:\n{log_tail(log_path)}")
            if _http_status(f"{url}/readyz") == 200:
                break
            if time.monotonic() > deadline:
                raise StepError(f"the service was not ready after {ready_timeout:.0f} s; log: {log_path}")
            time.sleep(0.5)
    except BaseException:
        _terminate(process.pid, process)
        raise
    info = {"url": url, "pid": process.pid, "host": host, "port": port, "model": model,
            "adapters": adapters or [], "engine": engine, "log": str(log_path),
            "workspace": workspace_name, "started_at": time.time()}
    tmp = workdir / (SERVICE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(workdir / SERVICE_FILE)
    return service


def read_service_file(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(workdir) / SERVICE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pid_is_bento(pid: int) -> bool:
    """Guard against a recycled pid: only signal a process that is really our bentoml server."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bentoml" in cmdline and SERVICE_IMPORT.encode() in cmdline


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (BentoML's workers run in process groups of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields_after_name[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _terminate(pid: int, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """SIGTERM the server (its supervisor stops the workers), SIGKILL whatever is left after ``timeout``."""
    workers = _children(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                break
        elif not pid_is_bento(pid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if process is not None:
            process.wait(5)
    for worker in workers:  # normally gone with the supervisor; never left running
        if pid_is_bento(worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def recorded_service_process(pid: int, info: dict[str, Any]) -> bool:
    """Whether ``pid``, read from a service file, is still the server that file describes.

    A pid in a file is only a number: the server may be gone and the number reused, or the file
    edited. Signalled only when all hold: the process is ours (uid), leads its own process group
    (the server is started in a new session), runs ``bentoml serve`` of kaiflow's service on the
    recorded host and port, and started before the file was written (a reused pid starts later).
    """
    try:
        stat = Path(f"/proc/{pid}")
        if stat.stat().st_uid != os.getuid() or os.getpgid(pid) != pid:
            return False
        argv = (stat / "cmdline").read_bytes().split(b"\0")
    except (OSError, ProcessLookupError):
        return False
    if b"bentoml" not in b" ".join(argv) or SERVICE_IMPORT.encode() not in argv:
        return False
    for flag, value in (("--port", info.get("port")), ("--host", info.get("host"))):
        if value is None or flag.encode() not in argv or argv.index(flag.encode()) + 1 >= len(argv) \
                or argv[argv.index(flag.encode()) + 1] != str(value).encode():
            return False
    started = _process_start_time(pid)
    recorded = info.get("started_at")
    return started is not None and isinstance(recorded, (int, float)) and started <= recorded + 1.0


def _process_start_time(pid: int) -> float | None:
    """Seconds since the epoch at which ``pid`` started (``/proc/<pid>/stat`` field 22)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def stop_local(workdir: str | os.PathLike[str] = ".kaiflow/serve", service: LocalService | None = None) -> bool:
    """Stop the local service started from ``workdir``; False when none was running."""
    workdir = Path(workdir)
    info = read_service_file(workdir)
    pid = service.pid if service else (info or {}).get("pid")
    stopped = False
    if isinstance(pid, int) and pid > 1 and (service is not None or recorded_service_process(pid, info or {})):
        _terminate(pid, service.process if service else None)
        stopped = True
    (workdir / SERVICE_FILE).unlink(missing_ok=True)
    return stopped


def resolve_url(url_or_workdir: str | os.PathLike[str]) -> str:
    """A URL as given, or the URL of the service recorded in a workdir (StepError if none)."""
    target = str(url_or_workdir)
    if target.startswith(("http://", "https://")):
        return target
    info = read_service_file(target)
    if info is None:
        raise StepError(f"no running service recorded in {target}/{SERVICE_FILE}; deploy first")
    return info["url"]
