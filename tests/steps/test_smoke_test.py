"""steps.smoke_test against the real tiny service, and its failures against broken servers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepkit.common import run_step
from steps.deploy.local_service import free_port
from steps.smoke_test import main


def test_passes_against_the_service(bento_tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KAIFLOW_API_KEY", bento_tiny.api_key)
    assert run_step(main, ["--url", bento_tiny.url, "--outputs", str(tmp_path)]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "smoke-test").read_text())
    assert isinstance(report["chat"], str) and report["finish_reason"] in ("stop", "length")
    assert report["stream_chunks"] >= 1 and report["first_token_seconds"] >= 0  # the untrained tiny model talks
    assert bento_tiny.api_key not in capsys.readouterr().out


def test_fails_on_a_refused_key(bento_tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KAIFLOW_API_KEY", "wrong")
    assert run_step(main, ["--url", bento_tiny.url, "--outputs", str(tmp_path)]) == 2
    assert "POST /chat answered 401" in capsys.readouterr().err


def test_fails_when_nothing_answers(tmp_path, capsys):
    """Not ready is worth a retry (exit 1): a rollout may just be slow."""
    url = f"http://127.0.0.1:{free_port()}"
    assert run_step(main, ["--url", url, "--ready-timeout", "1", "--outputs", str(tmp_path)]) == 1
    assert "not ready after 1 s" in capsys.readouterr().err


class BrokenChat(BaseHTTPRequestHandler):
    """Ready, but /chat returns no Result, or the stream is broken in the way the test picks."""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(b'{"data": [{"id": "m"}]}' if self.path == "/v1/models" else b"\n")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/chat":
            self._send(json.dumps({"Result": self.server.result}).encode())
        else:
            self._send(self.server.stream, "text/event-stream")


NO_DONE = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
NO_FINISH = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: [DONE]\n\n'
NOT_JSON = b"data: {oops\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize(
    ("result", "stream", "message"),
    [
        (None, NO_DONE, "POST /chat returned no Result string"),
        ("ok", NO_DONE, "ended without [DONE]"),
        ("ok", NO_FINISH, "never gave a finish_reason"),
        ("ok", NOT_JSON, "not JSON"),
    ],
)
def test_fails_on_a_broken_service(result, stream, message, tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenChat)
    server.result = result
    server.stream = stream
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run_step(main, ["--url", url, "--outputs", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    finally:
        server.shutdown()


def test_fails_when_v1_models_does_not_list_the_served_name(tmp_path, capsys):
    """Clients written from the docs send Kaito's served name: a service listing another gets exit 2."""
    good = b'data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenChat)
    server.result, server.stream = "ok", good
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run_step(main, ["--url", url, "--model", "mistral-7b-instruct-v0.3", "--outputs", str(tmp_path)]) == 2
        assert "lists ['m'], not 'mistral-7b-instruct-v0.3'" in capsys.readouterr().err
        assert run_step(main, ["--url", url, "--model", "m", "--outputs", str(tmp_path)]) == 0
    finally:
        server.shutdown()
