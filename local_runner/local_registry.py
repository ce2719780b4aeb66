"""A local OCI registry for local runs: Debian's ``docker-registry`` (CNCF distribution) on 127.0.0.1.

The local examples push their adapter to ``127.0.0.1:5000`` and pull it back for serving, the
same as a cluster run does with ACR; this module runs that registry.

* ``RegistryProcess`` runs ``/usr/bin/docker-registry serve config.yml`` on 127.0.0.1 with
  filesystem storage under its root directory, optionally behind htpasswd (bcrypt, made with
  ``htpasswd -B``; the password goes in on stdin, never on a command line). It can be stopped and
  started again on the same port and storage, and upload sessions survive that (the
  ``http.secret`` is made once per root and kept there).
* ``kaiflow registry [--port 5000] [--root .kaiflow/registry]`` runs one in the foreground until
  Ctrl-C: the one documented way to start it by hand.
* ``ensure_local_registry(host_port, root)`` returns ``None`` when a registry already answers
  there and otherwise starts one (the caller stops it). ``kaiflow run`` calls it, through
  ``local_runner.preflight``, when its Workspace pushes to or pulls from the local default
  ``127.0.0.1:5000`` and nothing answers there (same storage as ``kaiflow registry``; stopped when
  the run ends); ``make demo`` calls it too.

Only the standard library is imported: the test fixtures load this module on every test run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from stepkit.common import write_private

__all__ = ["DEFAULT_PORT", "LocalRegistryError", "RegistryProcess", "ensure_local_registry", "free_port",
           "registry_answers", "serve"]

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
DEFAULT_PORT = 5000
START_DEADLINE_S = 15.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")


class LocalRegistryError(RuntimeError):
    """The local registry cannot be started; the message says what to install or free."""


class TokenAuth(Protocol):
    """Distribution token auth settings (the test suite's token server provides them)."""

    realm: str
    service: str
    issuer: str
    root_bundle: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_answers(host_port: str, timeout_s: float = 1.0) -> bool:
    """Something on ``host_port`` answers ``GET /v2/`` as a registry does (200, or 401 when it wants auth)."""
    try:
        urllib.request.urlopen(f"http://{host_port}/v2/", timeout=timeout_s).close()
        return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RegistryProcess:
    """One ``docker-registry`` process with its config, storage and (optional) htpasswd file under ``root``."""

    def __init__(self, root: str | os.PathLike[str], *, username: str | None = None,
                 password: str | None = None, port: int | None = None, token_server: TokenAuth | None = None):
        if not Path(REGISTRY_BINARY).exists():
            raise LocalRegistryError(f"{REGISTRY_BINARY} is missing: apt-get install docker-registry "
                                     "(`make system-deps` does it)")
        self.workdir = Path(root)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"
        self.port = port or free_port()
        self.username = username
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"
        self.token_server = token_server
        self._write_config()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _http_secret(self) -> str:
        # Kept with the storage so upload sessions stay valid across a restart on the same root.
        path = self.workdir / "http-secret"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _write_config(self) -> None:
        auth = ""
        if self.token_server is not None:
            auth = ("auth:\n  token:\n"
                    f"    realm: {self.token_server.realm}\n    service: {self.token_server.service}\n"
                    f"    issuer: {self.token_server.issuer}\n    rootcertbundle: {self.token_server.root_bundle}\n")
        elif self.username is not None:
            if not Path(HTPASSWD_BINARY).exists():
                raise LocalRegistryError(f"{HTPASSWD_BINARY} is missing: apt-get install apache2-utils")
            htpasswd = self.workdir / "htpasswd"
            # -i reads the password from stdin so it never shows in the process list; -n prints the
            # entry, written here 0600 from the start (htpasswd -c would create it with the umask's mode)
            entry = subprocess.run([HTPASSWD_BINARY, "-n", "-B", "-i", self.username],
                                   input=(self.password or "").encode(), check=True, capture_output=True).stdout
            write_private(htpasswd, entry.strip() + b"\n")
            auth = f"auth:\n  htpasswd:\n    realm: kaiflow-local\n    path: {htpasswd}\n"
        config = self.workdir / "config.yml"
        text = ("version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n  secret: {self._http_secret()}\n" + auth)
        write_private(config, text)

    def start(self) -> RegistryProcess:
        if self.running:
            return self
        if _port_in_use(self.port):
            raise LocalRegistryError(f"port {self.port} on 127.0.0.1 is taken by another process")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen([REGISTRY_BINARY, "serve", str(self.workdir / "config.yml")],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalRegistryError(f"docker-registry exited with {self.process.returncode}: "
                                         f"{self.log_path.read_text()[-2000:]}")
            if registry_answers(self.host):
                return self
            time.sleep(0.05)
        self.stop()
        raise LocalRegistryError(f"docker-registry on {self.host} not ready within {START_DEADLINE_S} s "
                                 f"(log: {self.log_path})")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def docker_config(self, password: str | None = None) -> dict:
        """A ``.dockerconfigjson`` document with this registry's credentials (``password`` overrides)."""
        if self.username is None:
            raise ValueError("this registry has no authentication")
        secret = self.password if password is None else password
        token = base64.b64encode(f"{self.username}:{secret}".encode()).decode()
        return {"auths": {self.host: {"auth": token}}}

    def write_docker_config(self, path: str | os.PathLike[str], password: str | None = None) -> Path:
        """Write :meth:`docker_config` to ``path`` (mode 0600): what the steps take as ``--docker-config``."""
        return write_private(path, json.dumps(self.docker_config(password)))

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def ensure_local_registry(host_port: str = f"127.0.0.1:{DEFAULT_PORT}",
                          root: str | os.PathLike[str] = Path(".kaiflow") / "registry") -> RegistryProcess | None:
    """Make sure a registry answers on ``host_port`` (a 127.0.0.1/localhost address).

    Returns ``None`` when one already does (it is someone else's to stop), else the
    ``RegistryProcess`` started with storage under ``root``; the caller stops it when done.
    """
    host, _, port_text = host_port.rpartition(":")
    if host not in LOCAL_HOSTS or not port_text.isdigit():
        raise LocalRegistryError(f"{host_port!r}: a local registry runs on 127.0.0.1:PORT or localhost:PORT only")
    if registry_answers(f"127.0.0.1:{port_text}"):
        return None
    return RegistryProcess(root, port=int(port_text)).start()


def serve(port: int = DEFAULT_PORT, root: str | os.PathLike[str] = Path(".kaiflow") / "registry",
          username: str | None = None, password: str | None = None) -> int:
    """Run a registry in the foreground until Ctrl-C or SIGTERM (``kaiflow registry``)."""
    registry = RegistryProcess(root, username=username, password=password, port=port or None).start()
    print(f"registry {registry.host} (storage {registry.storage}); Ctrl-C stops it", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    died = False
    try:
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1.0):
                if not registry.running:
                    died = True
                    break
    finally:
        registry.stop()
        signal.signal(signal.SIGTERM, previous)
    if died:
        print(f"error: docker-registry stopped by itself (log: {registry.log_path})", flush=True)
        return 1
    return 0
