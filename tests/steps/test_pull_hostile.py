"""steps.pull_adapters against a hostile registry: a corpus of crafted manifests, blobs and auth answers.

Each case runs the real step as a subprocess against a small registry on 127.0.0.1 that serves
exactly the bytes the case crafted, then checks what a user cares about: exit 2 with one clear
line (no traceback), the user's files, an adapter pulled before and a file outside DEST all
byte-identical, no half-built adapter left, and the step's peak RSS under 1 GB (the child's own
``VmHWM``: see tests/fixtures/peak_rss.py).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from steps import pull_adapters as pull
from tests.fixtures.peak_rss import run_module_measured
from stepkit.oci import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

ROOT = Path(__file__).resolve().parents[2]
PEAK_RSS_LIMIT = 1 << 30
REPO = "adapters/hostile"
LAYER_TAR_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class HostileRegistry:
    """An OCI distribution API that answers whatever the test put in ``routes``.

    A route's body is bytes, or a callable that writes to the socket itself (endless answers).
    ``challenge`` makes every /v2/ request answer 401 with that WWW-Authenticate value.
    """

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.routes: dict[str, tuple[int, dict[str, str], bytes | Callable]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.challenge: str | None = None
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # an answer without length ends when the connection closes

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                registry.requests.append((self.command, path, dict(self.headers)))
                if registry.challenge and self.headers.get("Authorization") is None:
                    self._answer(401, {"WWW-Authenticate": registry.challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                    return
                if path == "/v2/":
                    self._answer(200, {"Content-Type": "application/json"}, b"{}")
                    return
                status, headers, body = registry.routes.get(
                    path, (404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"NOT_FOUND"}]}'))
                self._answer(status, headers, body)

            do_HEAD = do_GET  # noqa: N815

            def _answer(self, status: int, headers: dict[str, str], body: bytes | Callable) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    if isinstance(body, bytes):
                        self.wfile.write(body)
                    else:
                        body(self.wfile)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def manifest(self, reference: str, document: dict | bytes | Callable, media_type: str = OCI_MANIFEST) -> None:
        body = json.dumps(document).encode() if isinstance(document, dict) else document
        self.routes[f"/v2/{REPO}/manifests/{reference}"] = (200, {"Content-Type": media_type}, body)

    def blob(self, digest: str, body: bytes | Callable) -> None:
        self.routes[f"/v2/{REPO}/blobs/{digest}"] = (200, {"Content-Type": "application/octet-stream"}, body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile():
    registry = HostileRegistry()
    yield registry
    registry.close()


def endless(wfile, chunk: bytes = b"\0" * (1 << 16), cap: int = 2 << 30) -> None:
    """Bytes until the client hangs up (capped so a broken client cannot hang the test forever)."""
    sent = 0
    while sent < cap:
        wfile.write(chunk)
        sent += len(chunk)


def artifact(layers: list[dict]) -> dict:
    empty = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2}
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": empty, "layers": layers}


def titled(digest: str, size: int, title: str = "adapter_config.json") -> dict:
    return {"mediaType": "application/octet-stream", "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.title": title}}


def tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as archive:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def image_with_layer(registry: HostileRegistry, layer: bytes) -> None:
    """A Docker v2 image (Kaito's adapter image layout) whose one layer is ``layer``."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    registry.blob(sha256(config), config)
    registry.blob(sha256(layer), layer)
    registry.manifest("v1", {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                             "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                        "digest": sha256(config), "size": len(config)},
                             "layers": [{"mediaType": LAYER_TAR_GZ, "digest": sha256(layer), "size": len(layer)}]},
                      DOCKER_MANIFEST)


class World:
    """What a pull must never touch: the user's files in DEST, an adapter pulled earlier, a file outside."""

    def __init__(self, root: Path):
        self.root = root
        self.dest = root / "dest"
        (self.dest / "earlier").mkdir(parents=True)
        (self.dest / "earlier" / "adapter_config.json").write_text('{"r": 8}')
        (self.dest / "earlier" / "adapter_model.safetensors").write_bytes(b"\1" * 4096)
        (self.dest / "notes.txt").write_text("the user's own file")
        self.victim = root / "victim.txt"
        self.victim.write_text("precious, and deliberately of another size than any layer claims")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.root)): p.read_bytes() for p in sorted(self.root.rglob("*"))
                if p.is_file() and ".oci-cache" not in p.parts and "outputs" not in p.parts}

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.before
        assert not [p.name for p in self.dest.iterdir() if p.name.endswith((".partial", ".old"))]
        assert not (self.dest / "x").exists()


def run_pull(world: World, image: str, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of ``python -m steps.pull_adapters`` in a subprocess."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
    return run_module_measured(
        "steps.pull_adapters", "--adapter", f"x={image}", "--dest", str(world.dest),
        "--insecure", "--attempts", "2", "--backoff-s", "0.01", "--timeout-s", "10",
        "--outputs", str(world.root / "outputs"), *extra, cwd=ROOT, env=environment)


def assert_refused(world: World, image: str, expected: str, *extra: str) -> str:
    code, err, peak = run_pull(world, image, *extra)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
    world.assert_untouched()
    assert not (world.root / "outputs").exists()
    return err


# -- digests that would be paths ---------------------------------------------------------------
def test_layer_digest_that_is_an_absolute_path(hostile, tmp_path):
    world = World(tmp_path)
    hostile.manifest("v1", artifact([titled(str(world.victim), 1)]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "is not sha256:<64 lower-case hex>")


def test_layer_digest_that_climbs_out_of_the_cache(hostile, tmp_path):
    world = World(tmp_path)
    hostile.manifest("v1", artifact([titled("sha256:../../../victim.txt", 1)]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "'sha256:../../../victim.txt' is not sha256")


def test_index_entry_digest_that_climbs_out_of_the_cache(hostile, tmp_path):
    world = World(tmp_path)
    hostile.manifest("v1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:../../../victim.txt", "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}}]}, OCI_INDEX)
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "the image index names manifest digest")


@pytest.mark.parametrize("digest", ["/etc/passwd", "sha256:../../x", "sha256:" + "a" * 64 + "/../../x",
                                    "sha256:" + "A" * 64, "sha256:" + "a" * 64 + "\n", "../" + "a" * 64, None])
def test_cache_paths_come_only_from_digests(tmp_path, digest):
    cache = pull.BlobCache(tmp_path / "cache")
    for path_of in (cache.blob_path, cache.manifest_path):
        with pytest.raises(pull.RegistryError, match="is not sha256:<64 lower-case hex>"):
            path_of(digest)
    good = "sha256:" + "a" * 64
    assert cache.blob_path(good) == tmp_path / "cache" / "blobs" / "sha256" / ("a" * 64)


# -- names --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("member", "expected"), [
    ("data/.wh...", "whiteout of '..'"),
    ("data/.wh..", "whiteout of '.'"),
    ("data/.wh.", "whiteout of ''"),
    ("data/sub/.wh..wh.x", "whiteout of a whiteout"),
    ("data/../../victim.txt", "unsafe path"),
    ("data/a/../../../victim.txt", "unsafe path"),
])
def test_tar_entries_that_would_leave_the_adapter(hostile, tmp_path, member, expected):
    world = World(tmp_path)
    image_with_layer(hostile, tar_gz({"data/adapter_config.json": b"{}", member: b""}))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", expected)


@pytest.mark.parametrize(("title", "expected"), [
    ("adapter\0config.json", "control character"),
    ("..", "names a directory"),
    ("../victim.txt", "path separator"),
    ("/abs", "path separator"),
    ("", "is empty"),
])
def test_layer_titles_that_are_not_file_names(hostile, tmp_path, title, expected):
    world = World(tmp_path)
    data = b'{"r": 4}'
    hostile.blob(sha256(data), data)
    hostile.manifest("v1", artifact([titled(sha256(data), len(data), title)]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", expected)


# -- sizes --------------------------------------------------------------------------------------
class Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = b"\0" * count
        self.left -= count
        return count


def test_gzip_bomb_stops_at_max_bytes(hostile, tmp_path):
    world = World(tmp_path)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w") as archive:
        info = tarfile.TarInfo("data/adapter_model.safetensors")
        info.size = 65 << 20
        archive.addfile(info, io.BufferedReader(Zeros(info.size)))
    layer = buffer.getvalue()
    assert len(layer) < 0.2 * 2**20  # 0.1 MiB that expands to 65 MiB
    image_with_layer(hostile, layer)
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "goes past --max-bytes 16777216", "--max-bytes", str(16 << 20))


def test_layer_with_too_many_entries(hostile, tmp_path):
    world = World(tmp_path)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as archive:
        for index in range(pull.MAX_LAYER_ENTRIES + 1):
            archive.addfile(tarfile.TarInfo(f"etc/f{index}"))
    image_with_layer(hostile, buffer.getvalue())
    assert_refused(world, f"{hostile.host}/{REPO}:v1", f"has more than {pull.MAX_LAYER_ENTRIES} entries")


def test_blob_longer_than_declared_is_cut_off(hostile, tmp_path):
    world = World(tmp_path)
    data = b'{"r": 4}'
    hostile.blob(sha256(data), endless)
    hostile.manifest("v1", artifact([titled(sha256(data), len(data))]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", f"more than the {len(data)} bytes declared")


def test_declared_sizes_over_max_bytes_are_refused_before_download(hostile, tmp_path):
    world = World(tmp_path)
    data = b'{"r": 4}'
    hostile.blob(sha256(data), endless)
    hostile.manifest("v1", artifact([titled(sha256(data), 10 << 30)]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "declare 10737418240 bytes, more than --max-bytes 4294967296")
    assert not [path for _, path, _ in hostile.requests if "/blobs/" in path]


@pytest.mark.parametrize(("size", "expected"), [(-1, "size -1 is not a byte count"), ("12", "size '12'"),
                                                 (True, "size True")])
def test_declared_sizes_that_are_not_byte_counts(hostile, tmp_path, size, expected):
    world = World(tmp_path)
    hostile.manifest("v1", artifact([titled(sha256(b"x"), size)]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", expected)


def test_endless_manifest_is_capped(hostile, tmp_path):
    world = World(tmp_path)
    hostile.manifest("v1", lambda wfile: endless(wfile, b"[" * (1 << 16)))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "larger than the 4194304 bytes accepted")


def test_deeply_nested_manifest_is_not_a_traceback(hostile, tmp_path):
    world = World(tmp_path)
    hostile.manifest("v1", b"[" * 200_000 + b"]" * 200_000)
    assert_refused(world, f"{hostile.host}/{REPO}:v1", "is not valid JSON")


# -- token auth ---------------------------------------------------------------------------------
class TokenRealm:
    """A plain-http token endpoint that records what it was sent, optionally slow."""

    def __init__(self, delay_s: float = 0.0):
        self.seen: list[dict[str, str]] = []
        self.released = threading.Event()  # close() ends a delay at once
        realm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                realm.seen.append(dict(self.headers))
                realm.released.wait(delay_s)
                body = b'{"token": "t"}'
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def test_no_credentials_go_to_a_plain_http_realm_of_an_https_registry(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    realm = TokenRealm()
    registry = HostileRegistry(tls=context)
    try:
        registry.challenge = f'Bearer realm="{realm.url}",service="hostile",scope="repository:{REPO}:pull"'
        world = World(tmp_path / "w")
        secret = "s3cret-never-in-clear"
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {registry.host: {"auth": base64.b64encode(f"bot:{secret}".encode()).decode()}}}))
        args = ["--adapter", f"x={registry.host}/{REPO}:v1", "--dest", str(world.dest), "--docker-config", str(config),
                "--attempts", "1", "--outputs", str(world.root / "outputs")]
        environment = {**os.environ, "REQUESTS_CA_BUNDLE": str(ca_file),
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        result = subprocess.run([sys.executable, "-m", "steps.pull_adapters", *args], cwd=ROOT, env=environment,
                                capture_output=True, text=True, timeout=120)
    finally:
        registry.close()
        realm.close()
    assert result.returncode == 2, result.stderr
    assert "is plain http while the registry is https: refusing to send" in result.stderr
    assert secret not in result.stderr
    assert realm.seen == [], "nothing at all was sent to the http realm"
    assert registry.requests, "the registry was reached over TLS"
    world.assert_untouched()


def test_token_request_times_out_and_is_retried_then_exit_1(hostile, tmp_path):
    # The realm answers after 120 s: a client that ignored --timeout-s would take 240 s for its two
    # attempts, so the generous 60 s bound below tells the two apart on any machine, however loaded.
    realm = TokenRealm(delay_s=120.0)
    try:
        hostile.challenge = f'Bearer realm="{realm.url}",service="hostile",scope="repository:{REPO}:pull"'
        world = World(tmp_path)
        started = time.monotonic()
        code, err, _ = run_pull(world, f"{hostile.host}/{REPO}:v1", "--timeout-s", "0.5")
        elapsed = time.monotonic() - started
    finally:
        realm.close()
    assert code == 1, err
    assert "ReadTimeout requesting a token" in err and "after 2 attempts" in err
    assert len(realm.seen) == 2 and elapsed < 60
    world.assert_untouched()


# -- atomic placement ---------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_adapter_directory_is_swapped_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(pull, "_exchange", lambda first, second: False)
    final = tmp_path / "a"
    final.mkdir()
    (final / "old.bin").write_text("old")
    staging = tmp_path / ".a.1.partial"
    staging.mkdir()
    (staging / "new.bin").write_text("new")
    pull._replace_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_repull_replaces_an_adapter_in_place(hostile, tmp_path):
    world = World(tmp_path)
    first, second = b'{"r": 4}', b'{"r": 8, "lora_alpha": 16}'
    for data, tag in ((first, "v1"), (second, "v2")):
        hostile.blob(sha256(data), data)
        hostile.manifest(tag, artifact([titled(sha256(data), len(data))]))
    options = pull.RegistryOptions(insecure=True, attempts=1)
    pull.pull_adapters(pull.PullConfig([f"x={hostile.host}/{REPO}:v1"], str(world.dest)), options)
    assert (world.dest / "x" / "adapter_config.json").read_bytes() == first
    pull.pull_adapters(pull.PullConfig([f"x={hostile.host}/{REPO}:v2"], str(world.dest)), options)
    assert (world.dest / "x" / "adapter_config.json").read_bytes() == second
    assert sorted(p.name for p in world.dest.iterdir()) == [".oci-cache", "earlier", "notes.txt", "x"]



def test_an_anonymous_pull_asks_for_the_manifest_and_each_blob_once(hostile, tmp_path):
    """No GET /v2/ first (the scheme is learnt from a 401, when there is one); two layers with the
    same bytes are fetched once; the large blob and the small ones arrive on their own connections."""
    world = World(tmp_path)
    config, weights = b'{"r": 4}', os.urandom(3 << 20)
    hostile.blob(sha256(config), config)
    hostile.blob(sha256(weights), weights)
    hostile.manifest("v1", artifact([titled(sha256(config), len(config)),
                                     titled(sha256(weights), len(weights), "adapter_model.safetensors"),
                                     titled(sha256(config), len(config), "copy_of_config.json")]))
    options = pull.RegistryOptions(insecure=True, attempts=1)
    pull.pull_adapters(pull.PullConfig([f"x={hostile.host}/{REPO}:v1"], str(world.dest)), options)
    adapter = world.dest / "x"
    assert (adapter / "adapter_config.json").read_bytes() == config == (adapter / "copy_of_config.json").read_bytes()
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights
    paths = sorted(path for _, path, _ in hostile.requests)
    assert paths == sorted([f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/blobs/{sha256(config)}",
                            f"/v2/{REPO}/blobs/{sha256(weights)}"])


def test_a_corrupt_small_blob_beside_a_large_one_stops_the_pull(hostile, tmp_path):
    """The small blobs download while the large one streams; one that fails its digest fails the
    pull once every download has stopped, and DEST is left as it was."""
    world = World(tmp_path)
    config, weights = b'{"r": 4}', os.urandom(3 << 20)
    hostile.blob(sha256(config), b'{"r": 5}')  # the right size, the wrong bytes
    hostile.blob(sha256(weights), weights)
    hostile.manifest("v1", artifact([titled(sha256(config), len(config)),
                                     titled(sha256(weights), len(weights), "adapter_model.safetensors")]))
    assert_refused(world, f"{hostile.host}/{REPO}:v1", f"blob {sha256(config)[:19]} arrived with sha256")
    assert [path for _, path, _ in hostile.requests].count(f"/v2/{REPO}/blobs/{sha256(weights)}") >= 1
