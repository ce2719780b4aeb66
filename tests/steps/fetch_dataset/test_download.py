"""steps.fetch_dataset.download: which failures are retried, and the exit code each one ends in.

The exception is raised by an httpx transport (``httpx.MockTransport``) under the real client, so
the whole path runs: client, retry policy, classification, ``run_step``'s exit code.
"""

from __future__ import annotations

import errno

import httpx
import pytest

from stepkit.common import run_step
from steps.fetch_dataset.download import fetch
from stepkit.redaction import redact_text, redact_url

URL = "https://data.example/train.parquet?sv=2025&sig=SECRETSIG"
TRANSIENT, PERMANENT = 1, 2

CASES = [
    (httpx.ConnectError("connection refused"), TRANSIENT),
    (httpx.ConnectTimeout("timed out"), TRANSIENT),
    (httpx.ReadTimeout("timed out"), TRANSIENT),
    (httpx.PoolTimeout("no connection"), TRANSIENT),
    (httpx.ReadError("connection reset by peer"), TRANSIENT),
    (httpx.WriteError("broken pipe"), TRANSIENT),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), TRANSIENT),
    (httpx.ProxyError("proxy unreachable"), TRANSIENT),
    (OSError(errno.ENOSPC, "No space left on device"), TRANSIENT),
    (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'file://'."), PERMANENT),
    (httpx.TooManyRedirects("Exceeded maximum allowed redirects."), PERMANENT),
    (httpx.LocalProtocolError("Illegal header value"), PERMANENT),
    (httpx.DecodingError("invalid gzip"), PERMANENT),
    (httpx.InvalidURL("Invalid non-printable ASCII character in URL"), PERMANENT),
    (PermissionError(errno.EACCES, "Permission denied"), PERMANENT),
    (ValueError("something nobody foresaw"), PERMANENT),
    (KeyError("missing"), PERMANENT),
    (RuntimeError(f"bug while fetching {URL}"), PERMANENT),
]


@pytest.mark.parametrize(("error", "exit_code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_exception_class_decides_retry_and_exit_code(tmp_path, capsys, error, exit_code):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise error

    def main(argv=None) -> int:
        fetch(URL, tmp_path / "d.parquet", max_bytes=1 << 20, retries=2, backoff_s=0.01,
              transport=httpx.MockTransport(handler))
        return 0

    assert run_step(main, []) == exit_code
    assert len(calls) == (3 if exit_code == TRANSIENT else 1), "only transient failures are retried"
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in err
    assert type(error).__name__ in line[0] and "url 'https://data.example/train.parquet?sv=***&sig=***'" in line[0]
    assert "SECRETSIG" not in err
    if exit_code == TRANSIENT:
        assert "failed after 3 attempts" in line[0]
    assert not list(tmp_path.iterdir()), "no partial download is left"


@pytest.mark.parametrize(("status", "exit_code", "calls"), [(503, 1, 3), (429, 1, 3), (408, 1, 3), (500, 1, 3),
                                                             (404, 2, 1), (403, 2, 1), (401, 2, 1), (304, 2, 1)])
def test_status_codes(tmp_path, status, exit_code, calls):
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(status)

    def main(argv=None):
        fetch(URL, tmp_path / "d", max_bytes=100, retries=2, backoff_s=0.01, transport=httpx.MockTransport(handler))

    assert run_step(main, []) == exit_code
    assert len(seen) == calls


def test_transient_failure_then_success_counts_the_attempts(tmp_path):
    body = b"0123456789" * 100
    seen = []

    def handler(request):
        seen.append(request.headers.get("range"))
        if len(seen) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, content=iter([body]), headers={"content-type": "application/x-parquet"})

    got = fetch(URL, tmp_path / "d.parquet", max_bytes=1 << 20, retries=2, backoff_s=0.01,
                transport=httpx.MockTransport(handler))
    assert (got.size, got.attempts, got.content_type) == (len(body), 2, "application/x-parquet")
    assert (tmp_path / "d.parquet").read_bytes() == body


def test_stop_ends_a_download_at_its_next_chunk_and_keeps_nothing(tmp_path):
    import threading

    from steps.fetch_dataset.download import Stopped

    stop = threading.Event()
    sent = []

    def chunks():
        for i in range(100):
            if i == 3:
                stop.set()  # as the step does when an earlier file failed meanwhile
            sent.append(i)
            yield b"x" * 1000

    def handler(request):
        return httpx.Response(200, content=chunks())

    with pytest.raises(Stopped, match=r"download stopped after 3000 bytes"):
        fetch(URL, tmp_path / "d.parquet", max_bytes=1 << 20, retries=2, backoff_s=0.01,
              transport=httpx.MockTransport(handler), stop=stop)
    assert len(sent) == 4 and list(tmp_path.iterdir()) == []
    with pytest.raises(Stopped):  # set before the first attempt: no request at all
        fetch(URL, tmp_path / "e.parquet", max_bytes=1 << 20, transport=httpx.MockTransport(
            lambda request: pytest.fail("requested after stop")), stop=stop)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://a.blob.core.windows.net/c/t.parquet?sv=2025-01-01&se=2030&sp=r&sig=abc%2Bdef%3D",
     "https://a.blob.core.windows.net/c/t.parquet?sv=***&se=***&sp=***&sig=***"),
    ("https://bucket.s3.amazonaws.com/t.jsonl?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff00",
     "https://bucket.s3.amazonaws.com/t.jsonl?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://user:pa55@host:8443/p/t.csv", "https://***@host:8443/p/t.csv"),
    ("http://host/t.parquet#token=abc", "http://host/t.parquet#***"),
    ("file:///data/t.parquet", "file:///data/t.parquet"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"fetching '{url}' now") == f"fetching '{shown}' now"


def test_redact_text_masks_relative_queries_and_leaves_prose():
    assert redact_text("Location: /files/t.parquet?se=1&sig=abc") == "Location: /files/t.parquet?se=***&sig=***"
    assert redact_text("what? 2 + 2 = 4 & more") == "what? 2 + 2 = 4 & more"


def test_the_download_asks_the_socket_for_large_reads():
    """``read_in_large_pieces`` puts a network backend around the pool's own: every read of the
    response (plain or after TLS) asks for READ_BYTES, not httpcore's 64 KiB; writes, TLS and close
    reach the real stream. A recording stream stands in for the socket, so nothing depends on how
    the kernel splits the bytes."""
    import httpcore

    from steps.fetch_dataset.download import READ_BYTES, read_in_large_pieces

    asked: list[int] = []
    calls: list[str] = []

    class Recording(httpcore.NetworkStream):
        def __init__(self) -> None:
            self.pending = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

        def read(self, max_bytes, timeout=None):
            asked.append(max_bytes)
            data, self.pending = self.pending[:max_bytes], self.pending[max_bytes:]
            return data

        def write(self, buffer, timeout=None):
            calls.append("write")

        def close(self):
            calls.append("close")

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            calls.append(f"tls {server_hostname}")
            return self

        def get_extra_info(self, info):
            return None

    class Backend(httpcore.NetworkBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            calls.append(f"connect {host}:{port}")
            return Recording()

    for url in ("http://data.example/x.parquet", "https://data.example/x.parquet"):
        asked.clear(), calls.clear()
        transport = httpx.HTTPTransport()
        transport._pool._network_backend = Backend()
        read_in_large_pieces(transport)
        with httpx.Client(transport=transport) as client:
            assert client.get(url).content == b"hello"
        assert asked and set(asked) == {READ_BYTES} and READ_BYTES > 64 * 1024
        assert calls[0] == f"connect data.example:{443 if url.startswith('https') else 80}" and "write" in calls
        assert ("tls data.example" in calls) == url.startswith("https") and calls[-1] == "close"
