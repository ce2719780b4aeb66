"""A watch that must relist (410 Gone), on the box's real API server (issue 16).

The operator (kopf, as its own ServiceAccount) reaches the API server through a recording HTTP
proxy that can cut every connection and refuse new ones. While the operator is cut off, one
Workspace is created and another's spec is changed, and the CRD is re-applied with a changed
description (as an upgrade re-applies it): the API server then rebuilds the Workspaces' watch
cache from etcd, and a watch that resumes from any resourceVersion older than the rebuild is
answered ``410 Gone`` ("too old resource version"). The test waits until the server gives that
answer for a resourceVersion newer than anything the operator has seen, then lets the operator
back. Its watch resumes from its last resourceVersion, gets the 410 (seen in the proxy's record),
kopf lists the Workspaces again, and both changes get their Workflow. The periodic resync is set to
an hour, so the relist is the only way the operator can learn of them.

Why not compact etcd: a Workspace watch is served from the API server's watch cache, which keeps
the recent events in memory. On the box, compacting etcd at its current revision through its v3
HTTP gateway and then watching from an older resourceVersion still streamed the events after it
(tried by hand; kube-apiserver v1.33.13). Only a rebuilt watch cache forgets them.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import socketserver
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from api.labels import KAIFLOW_PREFIX, LABEL_GENERATION, LABEL_WORKSPACE
from tests.cluster.conftest import workspace_file
from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml"
EXAMPLE = "kaito_workspace_tuning_phi_3.yaml"
LAST_HANDLED = f"{KAIFLOW_PREFIX}/last-handled-configuration"  # kopf's record of what it handled


@dataclass
class Exchange:
    number: int
    method: str
    path: str
    status: int = 0
    answer: bytearray = field(default_factory=bytearray)

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

    def on(self, plural: str) -> bool:
        return urllib.parse.urlsplit(self.path).path.endswith(f"/{plural}")

    @property
    def watch(self) -> bool:
        return self.query.get("watch") == ["true"]


class CuttingProxy:
    """Plain HTTP on 127.0.0.1 in front of the box's TLS API server. Records every exchange (watches
    chunk by chunk); ``cut()`` closes every open connection and refuses new ones until ``mend()``."""

    def __init__(self, upstream: str, ca: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.host, self.port = parsed.hostname, parsed.port
        self.context = ssl.create_default_context(cafile=ca)
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        self.broken = threading.Event()
        self.live: set[socket.socket] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.broken.is_set():
                    self.close_connection = True
                    return
                with proxy.lock:
                    exchange = Exchange(len(proxy.exchanges), self.command, self.path)
                    proxy.exchanges.append(exchange)
                upstream = http.client.HTTPSConnection(proxy.host, proxy.port, context=proxy.context, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    with proxy.lock:
                        proxy.live.add(upstream.sock)
                    answer = upstream.getresponse()
                    exchange.status = answer.status
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while chunk := answer.read1(65536):
                        with proxy.lock:
                            exchange.answer += chunk
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except (OSError, http.client.HTTPException, ValueError):
                    self.close_connection = True  # cut: the operator sees its connection drop
                finally:
                    with proxy.lock:
                        proxy.live.discard(upstream.sock)
                    upstream.close()

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address):
                return not proxy.broken.is_set()  # refused: the socket is closed at once

            def process_request_thread(self, request, client_address):
                with proxy.lock:
                    proxy.live.add(request)
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    with proxy.lock:
                        proxy.live.discard(request)

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="cutting-proxy").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def cut(self) -> None:
        self.broken.set()
        with self.lock:
            sockets = list(self.live)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass

    def mend(self) -> None:
        self.broken.clear()

    def stop(self) -> None:
        self.cut()
        self.server.shutdown()

    def record(self) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges)


def workflows(box, namespace: str, workspace: str, generation: int | None = None) -> list[dict]:
    selector = f"{LABEL_WORKSPACE}={workspace}" + (f",{LABEL_GENERATION}={generation}" if generation else "")
    return box.list("workflows.argoproj.io", namespace=namespace, selector=selector)


def crd_with_description(text: str | None) -> str:
    """The install's CRD, its v1alpha1 schema described by ``text`` (None: the file as shipped)."""
    crd = yaml.safe_load(CRD.read_text())
    if text is not None:
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = text
    return yaml.safe_dump(crd)


def answers_too_old(box, namespace: str, resource_version: int) -> bool:
    """Whether the API server answers 410 Gone to a Workspace watch from ``resource_version``."""
    done = box.kubectl("get", "--raw", f"/apis/kaito.sh/v1beta1/namespaces/{namespace}/workspaces"
                       f"?watch=true&resourceVersion={resource_version}&timeoutSeconds=1", check=False, timeout=30)
    return '"code":410' in done.stdout


def test_a_watch_answered_410_gone_relists_and_loses_no_workspace(installed, tenant, start_controller, argo_agent,
                                                                  tmp_path):
    box = installed
    # Argo's pods wait in provision-nodes until the end: only the Workspaces change.
    hold = threading.Event()
    argo_agent.script(tenant, "provision-nodes", Outcome(outputs={"nodes": '["n"]', "provider": "karpenter"}),
                      hold=hold)
    proxy = CuttingProxy(box.server, str(box.pki.ca))
    kubeconfig = tmp_path / "proxied.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "p",
        "clusters": [{"name": "p", "cluster": {"server": proxy.url}}],
        "users": [{"name": "u", "user": {"token": box.token("kaiflow-controller", "kaiflow-system")}}],
        "contexts": [{"name": "p", "context": {"cluster": "p", "user": "u"}}]}))
    operator = start_controller(None, "--resync-s", "3600", "--provider", "karpenter", "--namespace", tenant,
                                kubeconfig=kubeconfig)
    crd_changed = False

    def story() -> str:
        lines = [f"{e.number} {e.method} {e.path} -> {e.status} {bytes(e.answer[:200])!r}"
                 for e in proxy.record() if e.on("workspaces")]
        return "\n".join(lines[-40:]) + "\n" + operator.log()[-4000:]

    try:
        changed = workspace_file(EXAMPLE, tenant, name="changed-while-cut")
        box.apply(changed)
        wait_until(lambda: workflows(box, tenant, "changed-while-cut", 1), timeout=60,
                   what="the first generation's Workflow", detail=story)
        # kopf has handled it, and its watch of the Workspaces is open
        wait_until(lambda: LAST_HANDLED in (box.get("workspace.kaito.sh", "changed-while-cut", tenant)
                                            ["metadata"].get("annotations") or {}),
                   timeout=60, what="kopf's record of the handled generation", detail=story)
        wait_until(lambda: any(e.on("workspaces") and e.watch for e in proxy.record()), timeout=60,
                   what="the operator's Workspace watch", detail=story)

        proxy.cut()
        # every resourceVersion the operator has seen is older than this object's
        marker = json.loads(box.kubectl("create", "configmap", "after-the-cut", "-n", tenant, "-o", "json").stdout)
        mark = int(marker["metadata"]["resourceVersion"])
        box.apply(workspace_file(EXAMPLE, tenant, name="created-while-cut"))
        changed["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
        box.apply(changed)
        box.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input=crd_with_description("Workspace, re-applied by tests/cluster/test_relist.py."))
        crd_changed = True
        wait_until(lambda: answers_too_old(box, tenant, mark), timeout=60,
                   what=f"410 Gone for a Workspace watch from resourceVersion {mark}")
        proxy.mend()

        created = wait_until(lambda: workflows(box, tenant, "created-while-cut"), timeout=90,
                             what="the Workflow of the Workspace created while the operator was cut off", detail=story)
        second = wait_until(lambda: workflows(box, tenant, "changed-while-cut", 2), timeout=90,
                            what="the second generation's Workflow", detail=story)
        assert len(created) == 1 and len(second) == 1, (created, second)

        record = proxy.record()
        gone = [e for e in record if e.on("workspaces") and e.watch and b'"code":410' in e.answer]
        assert gone, story()
        first = gone[0]
        assert int(first.query["resourceVersion"][0]) < mark, first.path  # it resumed from where it was
        assert b"too old resource version" in first.answer
        relists = [e for e in record if e.number > first.number and e.on("workspaces") and not e.watch
                   and e.method == "GET" and e.status == 200]
        assert relists, story()
        listed = json.loads(bytes(relists[0].answer))
        assert {"created-while-cut", "changed-while-cut"} <= {w["metadata"]["name"] for w in listed["items"]}
        # Gone while the operator runs: its finalizer releases the NodeClaims it requested for them.
        box.kubectl("delete", "wks", "--all", "-n", tenant, "--timeout=120s", timeout=150)
    finally:
        hold.set()
        operator.stop()
        proxy.stop()
        if crd_changed:
            box.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd_with_description(None))
