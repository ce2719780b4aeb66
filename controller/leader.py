"""Two replicas, one active: leader election on a ``coordination.k8s.io/v1`` Lease.

The replica holding the Lease runs the operator; the others wait (answering ``/healthz`` so the
kubelet keeps them). The holder renews every ``renew_s``; a replica takes the Lease over once its
record has not changed for ``duration_s`` *as measured on its own clock* (client-go's rule: no
comparison of timestamps written by another machine, so clock skew does not matter). A holder that
cannot renew before its own deadline stops at once (the process exits and the kubelet restarts it
as a waiting replica), so two replicas never act together for longer than the renew window; a
holder that stops cleanly (SIGTERM, a rollout) gives the Lease up and the next replica starts
within ``retry_s``.

Writes use the Lease's resourceVersion (optimistic concurrency): of two replicas trying at once,
the API server accepts one and answers 409 to the other. Handover after a crash takes at most
``duration_s + retry_s`` plus the operator's start (15 + 2 s + a few seconds by default).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stepkit import kube

log = logging.getLogger("kaiflow.controller.leader")
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """The pod's name (downward API ``POD_NAME``), else host and pid: unique per running replica."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class LeaderElector:
    client: Any
    namespace: str
    name: str
    identity: str = field(default_factory=default_identity)
    duration_s: float = 15.0
    renew_s: float = 5.0
    retry_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    # what this replica last saw of the Lease: (resourceVersion, when it changed on our clock)
    _observed: tuple[str, float] | None = None
    _renewed_at: float = 0.0

    @property
    def _path(self) -> str:
        return LEASE_PATH.format(namespace=self.namespace)

    def _record(self, holder: str, transitions: int, acquired: str | None = None) -> dict[str, Any]:
        now = _now_micro()
        return {"holderIdentity": holder, "leaseDurationSeconds": int(self.duration_s),
                "acquireTime": acquired or now, "renewTime": now, "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = kube.request(self.client, "GET", f"{self._path}/{self.name}")
        except ApiException as exc:
            if exc.status != 404:
                log.warning("reading Lease %s/%s: HTTP %s", self.namespace, self.name, exc.status)
                return False
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._record(self.identity, 0)}
            try:
                kube.request(self.client, "POST", self._path, body=body)
            except ApiException as exc2:
                log.info("creating Lease %s/%s: HTTP %s (another replica was first)", self.namespace, self.name,
                         exc2.status)
                return False
            self._renewed_at = self.clock()
            log.info("leading (%s): created Lease %s/%s", self.identity, self.namespace, self.name)
            return True
        except Exception as exc:  # noqa: BLE001 - unreachable API server: not leading this round
            log.warning("reading Lease %s/%s: %s", self.namespace, self.name, exc)
            return False

        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        now = self.clock()
        if self._observed is None or self._observed[0] != version:
            self._observed = (version, now)
        holder = spec.get("holderIdentity") or ""
        mine = holder == self.identity
        expired = not holder or now - self._observed[1] >= float(spec.get("leaseDurationSeconds") or self.duration_s)
        if not mine and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._record(self.identity, transitions, spec.get("acquireTime") if mine else None)
        try:
            updated = kube.request(self.client, "PUT", f"{self._path}/{self.name}", body=lease)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("updating Lease %s/%s: HTTP %s", self.namespace, self.name, exc.status)
            return False
        except Exception as exc:  # noqa: BLE001
            log.warning("updating Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        self._observed = (updated["metadata"]["resourceVersion"], self.clock())
        self._renewed_at = self.clock()
        if not mine:
            log.info("leading (%s): took Lease %s/%s over from %r", self.identity, self.namespace, self.name,
                     holder or None)
        return True

    def wait_to_lead(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica holds the Lease (True), or ``stop`` is set (False)."""
        log.info("waiting to lead (%s) on Lease %s/%s", self.identity, self.namespace, self.name)
        while not (stop and stop.is_set()):
            if self.try_acquire_or_renew():
                return True
            time.sleep(self.retry_s)
        return False

    def keep_leading(self, lost: Callable[[], None]) -> threading.Thread:
        """Renew in a thread; call ``lost`` once the Lease cannot be renewed before this replica's deadline."""

        def renew() -> None:
            while True:
                time.sleep(self.renew_s)
                if self.try_acquire_or_renew():
                    continue
                # not renewed: keep trying until the deadline, then stop acting
                while self.clock() - self._renewed_at < self.duration_s - self.retry_s:
                    time.sleep(self.retry_s)
                    if self.try_acquire_or_renew():
                        break
                else:
                    log.error("lost Lease %s/%s (%s): stopping", self.namespace, self.name, self.identity)
                    lost()
                    return

        thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the Lease up (a clean stop): the next replica need not wait for it to expire."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = kube.request(self.client, "GET", f"{self._path}/{self.name}")
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            kube.request(self.client, "PUT", f"{self._path}/{self.name}", body=lease)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except (ApiException, Exception) as exc:  # noqa: BLE001 - it expires on its own
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, exc)


class standby_health:  # noqa: N801 - a context manager, used as `with standby_health(port):`
    """``/healthz`` answered 200 while this replica waits (kopf serves it once it leads)."""

    def __init__(self, port: int | None) -> None:
        self.port = port
        self.server: Any = None

    def __enter__(self) -> standby_health:
        if not self.port:
            return self

        class Health(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200 if self.path.startswith("/healthz") else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("0.0.0.0", self.port), Health)
        threading.Thread(target=self.server.serve_forever, name="standby-health", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
