"""Issue 17 (Low): ``kaiflow stop`` (``stop_local``) signals the pid in the service file only when it
is still the server that file describes: ours, leading its own process group, ``bentoml serve`` of
kaiflow's service on the recorded host and port, started before the file was written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from steps.deploy.local_service import SERVICE_FILE, recorded_service_process, stop_local
from steps.deploy.manifests import SERVICE_IMPORT

SLEEPER = "import time; time.sleep(60)"


def impostor(*extra: str, new_session: bool = False) -> subprocess.Popen:
    """A process whose command line names bentoml and kaiflow's service (what the old check looked for)."""
    return subprocess.Popen([sys.executable, "-c", SLEEPER, "bentoml", "serve", SERVICE_IMPORT, *extra],
                            start_new_session=new_session)


def record(workdir, pid, port=4321, started_at=None):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SERVICE_FILE).write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": pid, "host": "127.0.0.1",
                                                    "port": port, "started_at": started_at or time.time()}))


def test_a_reused_or_foreign_pid_is_never_signalled(tmp_path):
    cases = [
        # not a process-group leader (the server is started in a new session)
        (impostor("--host", "127.0.0.1", "--port", "4321"), {}),
        # another port: another service
        (impostor("--host", "127.0.0.1", "--port", "9999", new_session=True), {}),
        # started after the file was written: the recorded server is gone and its number reused
        (impostor("--host", "127.0.0.1", "--port", "4321", new_session=True), {"started_at": time.time() - 3600}),
    ]
    try:
        time.sleep(0.3)
        for i, (process, extra) in enumerate(cases):
            workdir = tmp_path / f"serve-{i}"
            record(workdir, process.pid, **extra)
            assert stop_local(workdir) is False, i
            assert process.poll() is None, f"case {i}: the process was signalled"
    finally:
        for process, _ in cases:
            process.kill()
            process.wait()


def test_the_recorded_server_itself_is_recognised(tmp_path):
    process = impostor("--host", "127.0.0.1", "--port", "4321", new_session=True)
    try:
        time.sleep(0.3)
        info = {"pid": process.pid, "host": "127.0.0.1", "port": 4321, "started_at": time.time()}
        assert recorded_service_process(process.pid, info)
        assert not recorded_service_process(1, info)
    finally:
        process.kill()
        process.wait()
