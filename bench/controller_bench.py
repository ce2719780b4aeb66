"""The operator against an API server: create → Workflow latency, 500 Workspaces, memory.

Per round, a fresh API server and a fresh operator process (``kaiflow controller``). The API
server is the emulator (``tests/fixtures/kube.py`` with the CRD installed; ``--api emulator``), the
cluster box's real kube-apiserver with kaiflow's install applied and the operator running as its
own ServiceAccount (``tests/fixtures/cluster.py``; ``--api real``), or both side by side (the
default). Then:

* throughput: COUNT Workspaces created before the operator starts (an install on a busy cluster,
  or a restart); the time from starting the operator process until every Workspace has its
  Workflow and a status with ``observedGeneration`` (reconciled), from watch events. (Created
  while the operator runs, they are reconciled as fast as this emulator accepts them: ~6 creates/s
  here, so that figure would measure the emulator.)
* latency: then LATENCY Workspaces created one at a time beside those (the next once the
  previous one's Workflow exists); the time from just before the create request to the
  Workflow's ADDED event on a watch (p50, p99);
* memory: the operator's RSS at the end (psutil).

Prints each round and the median of ROUNDS. Argo is not played: nothing runs the Workflows,
so this measures the operator's own work (validate, render with Hera, create, write status).

    python -m bench.controller_bench [--api both|real|emulator] [--latency 50] [--count 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from tests.fixtures.kaiflow_controller import ControllerProcess, wait_for

ROOT = Path(__file__).resolve().parents[1]
WS = "/apis/kaito.sh/v1beta1/namespaces/default/workspaces"


class Watch:
    """A watch stream in a thread; records when each object was first ADDED and when reconciled.

    A real API server closes a watch whose reader falls behind (its buffer full) or at its own
    timeout; the stream is then opened again. A watch without a resourceVersion starts with an
    ADDED event for every object as it is now, so nothing is missed; an object first seen on a
    reopened stream is timed when it is seen (later than it happened, never earlier).
    """

    def __init__(self, url: str, path: str, context: ssl.SSLContext | None = None) -> None:
        host, port = url.split("://")[1].split(":")
        self._open = lambda: (http.client.HTTPSConnection(host, int(port), context=context) if context
                              else http.client.HTTPConnection(host, int(port)))
        self.path = path
        self.added: dict[str, float] = {}
        self.reconciled: dict[str, float] = {}
        self.reopened = 0
        self._closed = False
        self.conn = self._connect()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _connect(self) -> http.client.HTTPConnection:
        conn = self._open()
        conn.request("GET", self.path + "?watch=true")
        self.response = conn.getresponse()
        return conn

    def _read(self) -> None:
        while not self._closed:
            try:
                for line in self.response:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    name = (obj.get("metadata") or {}).get("name")
                    now = time.perf_counter()
                    if event.get("type") == "ADDED":
                        self.added.setdefault(name, now)
                    if (obj.get("status") or {}).get("observedGeneration"):
                        self.reconciled.setdefault(name, now)
            except (OSError, ValueError, http.client.HTTPException):
                pass
            if self._closed or self.reopened >= 100:
                return
            self.reopened += 1
            try:
                self.conn = self._connect()
            except (OSError, http.client.HTTPException):
                time.sleep(0.5)

    def close(self) -> None:
        self._closed = True
        # shutdown, not close: close() waits for the reader thread's lock on the response.
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)


class EmulatedApi:
    """The emulator with the Workspace CRD; the operator runs with the emulator's kubeconfig."""

    def __init__(self, workdir: Path) -> None:
        from api.crd import workspace_crd
        from tests.fixtures.kaito_cluster import crd_emulator_class, install_crd
        from tests.fixtures.kube import KubeCluster

        self.cluster = KubeCluster(workdir, emulator_class=crd_emulator_class())
        install_crd(self.cluster, workspace_crd())
        self.cluster.start()
        self.url, self.context, self.kubeconfig = self.cluster.url, None, self.cluster.kubeconfig

    def create(self, spec: dict) -> None:
        self.cluster.create(WS, spec)

    def close(self) -> None:
        self.cluster.stop()


class RealApi:
    """The cluster box's kube-apiserver with ``kubectl apply -k controller/manifests``; the operator
    runs with a token of its own ServiceAccount, as in a cluster."""

    def __init__(self, workdir: Path) -> None:
        from kubernetes import client, config

        from tests.fixtures.cluster import Cluster, cluster_tools

        self.box = Cluster(workdir / "box", cluster_tools()).start()
        # the install as docs/install.md gives it: the CRD on its own, then the rest
        manifests = ROOT / "controller" / "manifests"
        self.box.kubectl("apply", "--server-side", "-f", str(manifests / "kaito.sh_workspaces.yaml"))
        self.box.kubectl("apply", "-k", str(manifests))
        self.box.kubectl("wait", "--for=condition=Established", "crd/workspaces.kaito.sh", "--timeout=60s")
        self.url = self.box.server
        self.context = ssl.create_default_context(cafile=str(self.box.pki.ca))
        self.context.load_cert_chain(str(self.box.pki.admin_cert), str(self.box.pki.admin_key))
        self.kubeconfig = self.box.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
        self.custom = client.CustomObjectsApi(config.new_client_from_config(str(self.box.kubeconfig)))

    def create(self, spec: dict) -> None:
        group, version = spec["apiVersion"].split("/")
        self.custom.create_namespaced_custom_object(group, version, "default", "workspaces", spec)

    def close(self) -> None:
        self.box.stop()


def one_round(api_kind: str, latency_n: int, count: int, workdir: Path) -> dict[str, float]:
    spec = yaml.safe_load((ROOT / "examples" / "kaito_workspace_phi_3.yaml").read_text())
    api = RealApi(workdir) if api_kind == "real" else EmulatedApi(workdir)
    try:
        workflows = Watch(api.url, "/apis/argoproj.io/v1alpha1/workflows", api.context)
        workspaces = Watch(api.url, WS, api.context)
        # COUNT Workspaces waiting when the operator starts (an install on a busy cluster, or a
        # restart): how long until every one has its Workflow and a status.
        names = [f"bulk-{i:04d}" for i in range(count)]
        for name in names:
            spec["metadata"]["name"] = name
            api.create(spec)
        started = time.perf_counter()
        controller = ControllerProcess(api.kubeconfig, workdir, ["--resync-s", "600"]).start()
        try:
            wait_for(lambda: all(n in workspaces.reconciled for n in names) and
                     all(f"{n}-inference-1" in workflows.added for n in names),
                     timeout=1800, interval=0.2, what=f"{count} reconciled",
                     on_fail=lambda: f"reconciled {sum(n in workspaces.reconciled for n in names)}\n" + controller.log())
            total = max(workspaces.reconciled[n] for n in names) - started

            # Then one at a time, beside those COUNT: create → Workflow.
            latencies = []
            for i in range(latency_n):
                name = f"lat-{i}"
                spec["metadata"]["name"] = name
                begun = time.perf_counter()
                api.create(spec)
                wait_for(lambda n=name: f"{n}-inference-1" in workflows.added, timeout=60, interval=0.002,
                         what=name, on_fail=controller.log)
                latencies.append(workflows.added[f"{name}-inference-1"] - begun)
            rss = psutil.Process(controller.pid).memory_info().rss / 2**20
        finally:
            controller.stop()
            workflows.close()
            workspaces.close()
    finally:
        api.close()
    print("  slowest creates (index, ms):", sorted(((round(v * 1000), i) for i, v in enumerate(latencies)), reverse=True)[:3],
          f"; watch streams reopened: {workflows.reopened + workspaces.reopened}")
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000,
        "reconcile_s": total,
        "rss_mib": rss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=int, default=50, help="Workspaces for the latency figures")
    parser.add_argument("--count", type=int, default=500, help="Workspaces created at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--api", choices=("both", "real", "emulator"), default="both",
                        help="the API server: the cluster box's real one, the emulator, or both side by side")
    args = parser.parse_args(argv)
    kinds = ("real", "emulator") if args.api == "both" else (args.api,)
    rounds: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:  # side by side in each round, so load drifts hit both alike
            with tempfile.TemporaryDirectory(prefix="kaiflow-controller-bench-") as tmp:
                result = one_round(kind, args.latency, args.count, Path(tmp))
            rounds[kind].append(result)
            print(f"round {r + 1} [{kind}]: {args.count} waiting Workspaces reconciled {result['reconcile_s']:.1f} s "
                  f"after the operator started; then create→Workflow p50 {result['p50_ms']:.0f} ms, "
                  f"p99 {result['p99_ms']:.0f} ms (n={args.latency}); operator RSS {result['rss_mib']:.0f} MiB", flush=True)
    for kind in kinds:
        med = {k: statistics.median(r[k] for r in rounds[kind]) for k in rounds[kind][0]}
        print(f"median of {args.rounds} [{kind}]: p50 {med['p50_ms']:.0f} ms, p99 {med['p99_ms']:.0f} ms, "
              f"{args.count} reconciled in {med['reconcile_s']:.1f} s, RSS {med['rss_mib']:.0f} MiB")
    print(f"(load average now {psutil.getloadavg()[0]:.1f} on {psutil.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
