"""stepkit.oci: references, docker-config parsing, and retries on 5xx through a fault-injecting proxy."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import threading
import time

import pytest

import api.image_ref as api_image_ref
from steps import push_adapter as push
from stepkit import retry
from stepkit.common import RetryableError, StepError
from stepkit.oci import (
    CorruptTransferError,
    Credentials,
    ImageRef,
    RegistryError,
    RegistryOptions,
    RegistryUnavailableError,
    TransientError,
    credentials_for,
    load_docker_config,
    parse_image,
    registry_retries,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:5000/adapters/tiny:v1", ImageRef("127.0.0.1:5000", "adapters/tiny", "v1")),
    ("myadapter:0.1", ImageRef("docker.io", "library/myadapter", "0.1")),
    ("oci://ghcr.io/org/adapter:2026.1", ImageRef("ghcr.io", "org/adapter", "2026.1")),
])
def test_steps_parse_with_the_one_parser(text, expected):
    assert parse_image(text) == expected
    assert ImageRef is api_image_ref.ImageRef, "stepkit.oci re-exports api.image_ref's parser"


@pytest.mark.parametrize(("text", "expected"), [
    ("Registry.io/UPPER:v1", "lower case"),
    ("registry.io/x:bad tag", "whitespace"),
    ("registry.io/x@sha256:short", "64 lower-case hex"),
])
def test_bad_image_references_name_the_flag(text, expected):
    with pytest.raises(StepError, match=expected) as error:
        parse_image(text, "--image")
    assert str(error.value).startswith("--image: ") and "not an OCI image reference" in str(error.value)


def test_docker_config_entry_forms(tmp_path):
    encoded = base64.b64encode(b"alice:pa:ss").decode()
    document = {"auths": {
        "https://one.example.com/v1/": {"auth": encoded},
        "two.example.com": {"username": "bob", "password": "pw2"},
        "three.example.com": {"registrytoken": "tok"},
        "localhost:5000": {"identitytoken": "refresh"},
    }}
    assert credentials_for(document, "one.example.com") == Credentials("alice", "pa:ss")
    assert credentials_for(document, "two.example.com") == Credentials("bob", "pw2")
    assert credentials_for(document, "three.example.com") == Credentials(registry_token="tok")
    identity = credentials_for(document, "127.0.0.1:5000")
    assert identity.username == "00000000-0000-0000-0000-000000000000" and identity.password == "refresh"
    assert credentials_for(document, "four.example.com") is None
    assert "pa:ss" not in repr(credentials_for(document, "one.example.com"))


def test_docker_config_errors_never_quote_the_file(tmp_path):
    broken = tmp_path / "config.json"
    broken.write_text('{"auths": {"r.io": {"auth": "c2VjcmV0LXBhc3N3b3Jk"}')  # truncated JSON
    with pytest.raises(StepError) as error:
        load_docker_config(broken)
    assert "not valid JSON" in str(error.value) and "c2Vj" not in str(error.value)
    with pytest.raises(StepError, match="not base64"):
        credentials_for({"auths": {"r.io": {"auth": "%%%"}}}, "r.io", "cfg")
    with pytest.raises(StepError, match="file not found"):
        load_docker_config(tmp_path / "missing.json")


def test_docker_config_directory_is_a_mounted_secret(tmp_path):
    (tmp_path / ".dockerconfigjson").write_text(json.dumps({"auths": {"r.io": {"auth": base64.b64encode(b"u:p").decode()}}}))
    assert credentials_for(load_docker_config(tmp_path), "r.io") == Credentials("u", "p")


def test_registry_retries_back_off_then_give_up():
    calls: list[float] = []

    def always_down():
        calls.append(time.monotonic())
        raise TransientError("connection refused")

    with pytest.raises(RegistryUnavailableError, match="after 4 attempts: connection refused") as error:
        registry_retries("pinging", always_down, RegistryOptions(attempts=4, backoff_s=0.05), "r.io")
    assert isinstance(error.value, RetryableError), "exit 1: the pipeline tries the step again later"
    assert TransientError is retry.TransientError, "one retry policy: stepkit.retry's"
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 4
    assert gaps[0] >= 0.04 and gaps[2] >= 0.16  # 0.05, 0.1, 0.2 with ±20 % jitter


def test_a_blob_corrupt_on_every_attempt_is_not_retryable():
    def always_corrupt():
        raise CorruptTransferError("blob sha256:0123 arrived with sha256 sha256:4567 and 3 bytes")

    with pytest.raises(RegistryError, match="after 2 attempts: blob sha256:0123 arrived") as error:
        registry_retries("downloading", always_corrupt, RegistryOptions(attempts=2, backoff_s=0.01), "r.io")
    assert not isinstance(error.value, RetryableError), "the registry's copy is corrupt: exit 2"


class FlakyProxy:
    """A real HTTP proxy in front of the registry that answers 503 to the first ``fail_first`` requests."""

    def __init__(self, upstream_port: int, fail_first: int):
        self.fail_first = fail_first
        self.served_errors = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    fail = proxy.served_errors < proxy.fail_first
                    proxy.served_errors += fail
                if fail:
                    payload = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the test proxy"}]}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_PATCH = do_DELETE = _relay  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_5xx_answers_are_retried_until_the_push_succeeds(oci_registry, tune_output_dir):
    proxy = FlakyProxy(oci_registry.port, fail_first=3)
    try:
        result = push.push_adapter(push.PushConfig(str(tune_output_dir), f"{proxy.host}/adapters/flaky:v1"),
                                   RegistryOptions(insecure=True, attempts=5, backoff_s=0.05))
    finally:
        proxy.close()
    assert proxy.served_errors == 3
    assert result.digest.startswith("sha256:")


def test_persistent_5xx_gives_a_clear_error(oci_registry, tune_output_dir, tmp_path):
    proxy = FlakyProxy(oci_registry.port, fail_first=10**6)
    try:
        with pytest.raises(RegistryUnavailableError) as error:
            push.push_adapter(push.PushConfig(str(tune_output_dir), f"{proxy.host}/adapters/down:v1"),
                              RegistryOptions(insecure=True, attempts=3, backoff_s=0.05))
    finally:
        proxy.close()
    assert "HTTP 503" in str(error.value) and "after 3 attempts" in str(error.value) and proxy.host in str(error.value)


def test_hashing_writer_hashes_and_writes_in_order_and_raises_a_write_error_in_the_caller():
    import hashlib
    import io

    from stepkit.oci.client import HashingWriter

    chunks = [bytes([i]) * 5000 for i in range(20)]
    out = io.BytesIO()
    with HashingWriter(out) as sink:
        for chunk in chunks:
            sink.put(chunk)
    assert out.getvalue() == b"".join(chunks)
    assert sink.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with HashingWriter(Full()) as sink:
            for chunk in chunks:
                sink.put(chunk)
