"""The registry client: oras-py's ``Registry`` with kaiflow's retries, auth, limits and streaming.

See the package docstring (``stepkit/oci/__init__.py``) for why each part differs from oras-py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import oras.auth.utils
import oras.container
import oras.provider
import oras.utils
import requests

from stepkit.oci.credentials import Credentials, credentials_for, load_docker_config
from stepkit.oci.errors import (
    CorruptTransferError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryUnavailableError,
    TransientError,
)
from stepkit.oci.manifests import ANNOTATION_TITLE, CHUNK_BYTES, MANIFEST_ACCEPT, OCI_MANIFEST
from stepkit.oci.references import ImageRef, is_digest
from stepkit.retry import call_with_retries

log = logging.getLogger("kaiflow.stepkit.oci")

# distribution refuses manifests over 4 MiB; no answer we read whole (manifest, tag list, token,
# error) has a reason to be larger, so a registry sending more is refused rather than buffered.
MAX_BODY_BYTES = 4 << 20
ERROR_BODY_BYTES = 64 << 10
# Blobs up to this size are hashed in the receiving thread: starting the writer thread costs more
# than the overlap saves (an adapter's config and metadata files are a few KiB).
THREADED_HASH_BYTES = 4 * CHUNK_BYTES

T = TypeVar("T")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class RegistryOptions:
    """How to reach the registry: shared by push_adapter, pull_adapters and eval_gate."""

    docker_config: str | None = field(default=None, metadata={
        "help": "docker config JSON with registry credentials (the mounted imagePushSecret/imagePullSecret, "
                ".dockerconfigjson format); without it the registry is used anonymously"})
    insecure: bool = field(default=False, metadata={
        "help": "talk plain http to the registry (local/test registries only)"})
    attempts: int = field(default_factory=lambda: int(_env_float("KAIFLOW_OCI_ATTEMPTS", 5)), metadata={
        "help": "tries per operation on connection errors and 5xx answers (env KAIFLOW_OCI_ATTEMPTS)"})
    backoff_s: float = field(default_factory=lambda: _env_float("KAIFLOW_OCI_BACKOFF_S", 1.0), metadata={
        "help": "first retry delay in seconds, doubled per retry up to 30 s (env KAIFLOW_OCI_BACKOFF_S)"})
    timeout_s: float = field(default=60.0, metadata={
        "help": "socket timeout of one request (registry and token server) in seconds"})


def registry_retries(what: str, operation: Callable[[], T], options: RegistryOptions, registry: str) -> T:
    """``stepkit.retry.call_with_retries`` over ``TransientError``, the last failure mapped to an exit code:
    a blob corrupt on every attempt is ``RegistryError`` (exit 2), anything else ``RegistryUnavailableError``
    (exit 1)."""
    attempts = max(1, options.attempts)
    try:
        return call_with_retries(operation, what=what, attempts=attempts, backoff_s=options.backoff_s)
    except CorruptTransferError as exc:
        raise RegistryError(f"{what} failed on registry {registry} after {attempts} attempts: {exc}") from None
    except TransientError as exc:
        raise RegistryUnavailableError(f"{what} failed on registry {registry} after {attempts} attempts: {exc}") from None


def read_capped(response: requests.Response, limit: int, what: str) -> bytes:
    """The body of a streamed response, refused when it is larger than ``limit`` bytes."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        response.close()
        raise RegistryError(f"{what}: the answer declares {int(declared)} bytes, more than the {limit} accepted")
    parts, size = [], 0
    try:
        for chunk in response.iter_content(chunk_size=64 << 10):
            size += len(chunk)
            if size > limit:
                response.close()
                raise RegistryError(f"{what}: the answer is larger than the {limit} bytes accepted")
            parts.append(chunk)
    except requests.RequestException as exc:
        raise TransientError(f"{exc.__class__.__name__} while reading the answer to {what}") from None
    return b"".join(parts)


def _error_text(response: requests.Response) -> str:
    """The registry's OCI error codes/messages (they never contain our credentials), read capped."""
    try:
        body = response.raw.read(ERROR_BODY_BYTES, decode_content=True) if response.raw is not None else b""
        errors = json.loads(body).get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")[:300] for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts[:5])
    except Exception:  # noqa: BLE001 - any unreadable error body falls back to the status line
        pass
    return response.reason or f"HTTP {response.status_code}"


def parse_json_object(raw: bytes, what: str) -> dict:
    """A JSON object from untrusted bytes; malformed or absurdly nested input is a ``RegistryError``."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise RegistryError(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return document


class HashingWriter:
    """Hashes (sha256) and writes chunks in a second thread while the caller reads the next one.

    Hashing 50 MiB costs about as much as receiving it on loopback; hashlib and file writes release
    the GIL, so the two overlap instead of adding up (bench/oci_bench.py). At most four chunks wait.
    With ``threaded=False`` (small blobs: a thread start costs more than it could overlap) the
    chunks are hashed and written in the caller's thread.
    """

    def __init__(self, out: Any, threaded: bool = True) -> None:
        self._out = out
        self._hasher = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="blob-writer", daemon=True) if threaded else None

    def __enter__(self) -> HashingWriter:
        if self._thread is not None:
            self._thread.start()
        return self

    def _drain(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if self._error is None:
                try:
                    self._hasher.update(chunk)
                    self._out.write(chunk)
                except BaseException as exc:  # disk full, ...: raised in the caller's thread
                    self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._hasher.update(chunk)
            self._out.write(chunk)
            return
        self._chunks.put(chunk)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class RegistryClient(oras.provider.Registry):
    """One registry + repository, with credentials from a docker config and the retry policy above."""

    def __init__(self, image: ImageRef, options: RegistryOptions | None = None):
        self.image = image
        self.options = options or RegistryOptions()
        self.credentials: Credentials | None = None
        if self.options.docker_config:
            document = load_docker_config(self.options.docker_config)
            self.credentials = credentials_for(document, image.registry, f"--docker-config {self.options.docker_config}")
            if self.credentials is None:
                log.warning("--docker-config %s has no entry for %s: trying anonymously",
                            self.options.docker_config, image.registry)
        super().__init__(hostname=image.api_host, insecure=self.options.insecure, auth_backend="token")
        # How the registry wants to be asked is learnt from the first 401 it answers (as oras-go and
        # containerd do), not from a GET /v2/ beforehand: an anonymous pull saves that round trip.
        self._challenge_scheme: str | None = None
        self._bearer: str | None = None
        if self.credentials and self.credentials.basic:
            self.auth.set_basic_auth(self.credentials.username, self.credentials.password)
        if self.credentials and self.credentials.registry_token:
            self._bearer = self.credentials.registry_token
        self.container = oras.container.Container(f"{image.repository}:{image.tag or 'latest'}", registry=image.api_host)

    # -- where and who ------------------------------------------------------------------------
    @property
    def _scheme(self) -> str:
        return "http" if self.options.insecure else "https"

    @property
    def base_url(self) -> str:
        return f"{self._scheme}://{self.image.api_host}/v2/{self.image.repository}"

    def _where(self) -> str:
        return f"registry {self.image.registry}, repository {self.image.repository}"

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        return registry_retries(what, operation, self.options, self.image.registry)

    def _use_basic(self) -> None:
        """The registry answered a ``Basic`` challenge: send the docker config's pair from now on."""
        if not (self.credentials and self.credentials.basic):
            where = f"--docker-config {self.options.docker_config}" if self.options.docker_config else "no --docker-config given"
            raise RegistryAuthError(f"{self._where()} requires a username and password (HTTP Basic) and there are "
                                    f"none for {self.image.registry} ({where})")
        self.auth = oras.auth.get_auth_backend("basic", self.session, self.options.insecure, tls_verify=self._tls_verify)
        self.auth.set_basic_auth(self.credentials.username, self.credentials.password)
        self._challenge_scheme = "basic"

    # -- requests -----------------------------------------------------------------------------
    def _auth_header(self) -> dict[str, str]:
        if self._challenge_scheme == "basic":
            return self.auth.get_auth_header()
        if self._bearer:
            return {"Authorization": f"Bearer {self._bearer}"}
        return {}

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any, json_body: Any):
        if hasattr(data, "seek"):
            data.seek(0)
        try:
            # Always streamed: bodies are read by the caller with a size cap (read_capped), so a
            # hostile registry cannot make the step buffer an endless answer.
            response = self.session.request(method, url, data=data, json=json_body, headers=headers, stream=True,
                                            timeout=self.options.timeout_s, verify=self._tls_verify,
                                            allow_redirects=True)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"TLS error talking to {self._where()}: {exc.__class__.__name__}"
                                " (use --insecure only for a plain-http registry)") from None
        except requests.RequestException as exc:
            raise TransientError(f"{exc.__class__.__name__} during {method} {url.split('?')[0]}") from None
        if response.status_code >= 500 or response.status_code == 429:
            text = _error_text(response)
            response.close()
            raise TransientError(f"HTTP {response.status_code} ({text}) for {method} {url.split('?')[0]}")
        return response

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict | None = None,
                   json: Any = None, stream: bool = False) -> requests.Response:
        """One request; one re-authentication on 401; TransientError for what is worth retrying.

        Unless ``stream``, a successful answer's body is read (at most ``MAX_BODY_BYTES``) so that
        ``.content``/``.json()`` work and the connection goes back to the pool.
        """
        headers = dict(headers or {})
        headers.update(self._auth_header())
        response = self._send(method, url, headers, data, json)
        if response.status_code == 401 and self._challenge_scheme != "basic":
            header = response.headers.get("WWW-Authenticate", "")
            challenge = oras.auth.utils.parse_auth_header(header)
            if header.split(" ", 1)[0].lower() == "basic":
                response.close()
                self._use_basic()
                headers.update(self._auth_header())
                response = self._send(method, url, headers, data, json)
            elif challenge.realm and (self.credentials is None or not self.credentials.registry_token):
                # Always ask again: the challenge names the scope this request needs (pull vs push).
                token = self.request_token(challenge)
                self._bearer = token
                headers.update(self._auth_header())
                response.close()
                response = self._send(method, url, headers, data, json)
        if not stream and response.status_code < 300:
            # A HEAD has no body (its Content-Length is the blob's); marking it read keeps the
            # connection in the pool. requests' own idiom for a body already read: Response.content
            # fills these two attributes.
            body = b"" if method == "HEAD" else read_capped(response, MAX_BODY_BYTES, f"{method} {url.split('?')[0]}")
            response._content, response._content_consumed = body, True
        return response

    def request_token(self, challenge: Any) -> str:
        """A bearer token from the challenge's realm (distribution token auth), with the request timeout.

        The docker config's credentials go only to an https realm, or to an http one when the
        registry itself is plain http (``--insecure``): an https registry that points clients at
        an http realm would have them send the password in clear text.
        """
        realm = urlsplit(challenge.realm)
        where = f"{self._where()}: token server {realm.scheme}://{realm.netloc}"
        if realm.scheme not in ("http", "https") or not realm.netloc:
            raise RegistryAuthError(f"{self._where()}: the token realm {challenge.realm[:200]!r} is not an http(s) URL")
        headers = {"Accept": "application/json"}
        if self.credentials and self.credentials.basic:
            if realm.scheme == "http" and not self.options.insecure:
                raise RegistryAuthError(f"{where} is plain http while the registry is https: refusing to send "
                                        "the docker config's credentials there")
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        params = {key: value for key, value in (("service", challenge.service), ("scope", challenge.scope)) if value}
        try:
            response = self.session.get(challenge.realm, params=params, headers=headers, stream=True,
                                        timeout=self.options.timeout_s, verify=self._tls_verify)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"TLS error talking to {where}: {exc.__class__.__name__}") from None
        except requests.RequestException as exc:
            raise TransientError(f"{exc.__class__.__name__} requesting a token from {where}") from None
        status = response.status_code
        if status >= 500 or status in (408, 429):
            response.close()
            raise TransientError(f"HTTP {status} from {where}")
        if status in (401, 403):
            text = _error_text(response)
            response.close()
            who = f"user {self.credentials.username!r}" if self.credentials and self.credentials.username else "anonymous access"
            raise RegistryAuthError(f"{where} rejected {who} (HTTP {status}: {text}); check the credentials in the "
                                    "docker config")
        if status != 200:
            text = _error_text(response)
            response.close()
            raise RegistryError(f"{where} answered HTTP {status} ({text})")
        document = parse_json_object(read_capped(response, MAX_BODY_BYTES, where), f"the answer of {where}")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{where} answered without a token")
        return token

    def check(self, response: requests.Response, what: str, ok: Iterable[int] = (200, 201, 202)) -> requests.Response:
        """Map a final answer to an error that names the registry and repository."""
        if response.status_code in ok:
            return response
        text = _error_text(response)
        status = response.status_code
        response.close()
        if status == 401:
            who = f"user {self.credentials.username!r}" if self.credentials and self.credentials.username else (
                "the token" if self.credentials else "anonymous access")
            raise RegistryAuthError(f"{what}: {self._where()} rejected {who} (401 unauthorized: {text}); "
                                    "check the credentials in the docker config")
        if status == 403:
            raise RegistryAuthError(f"{what}: {self._where()} denied access (403 forbidden: {text}); "
                                    "the credentials lack pull/push permission on this repository")
        if status == 404:
            raise RegistryNotFoundError(f"{what}: not found on {self._where()} (404: {text})")
        raise RegistryError(f"{what}: {self._where()} answered HTTP {status} ({text})")

    # -- blobs --------------------------------------------------------------------------------
    def _blob_exists(self, digest: str) -> bool:
        response = self.do_request(f"{self.base_url}/blobs/{digest}", "HEAD")
        response.close()
        if response.status_code in (401, 403):
            self.check(response, f"checking blob {digest[:19]}")
        return response.status_code == 200

    def blob_exists_digest(self, digest: str) -> bool:
        return self._retrying(f"checking blob {digest[:19]}", lambda: self._blob_exists(digest))

    def put_upload(self, blob: str, container: Any, layer: dict) -> requests.Response:
        """POST + monolithic PUT streamed from the file (oras-py reads the whole blob into memory)."""
        response = self.check(self.do_request(f"{self.base_url}/blobs/uploads/", "POST",
                                              headers={"Content-Length": "0"}), "starting a blob upload")
        url = oras.utils.append_url_params(self._location(response), {"digest": layer["digest"]})
        headers = {"Content-Length": str(layer["size"]), "Content-Type": "application/octet-stream"}
        with open(blob, "rb") as body:
            return self.do_request(url, "PUT", data=body, headers=headers)

    def upload_file(self, path: str | os.PathLike[str], descriptor: dict, name: str | None = None) -> None:
        """Upload one blob (skipped when the registry has it), retried as a whole."""
        name = name or descriptor.get("annotations", {}).get(ANNOTATION_TITLE, descriptor["digest"][:19])

        def attempt() -> None:
            if self._blob_exists(descriptor["digest"]):
                log.info("blob %s (%s) already in the registry", name, descriptor["digest"][:19])
                return
            self.check(self.put_upload(str(path), self.container, descriptor), f"uploading {name}", ok=(201, 202, 204))

        self._retrying(f"uploading {name}", attempt)

    def upload_streamed(self, path: str | os.PathLike[str], media_type: str, title: str) -> dict:
        """Upload a file in one pass and return its descriptor: hashed while it streams.

        A monolithic PUT needs the digest in its URL before the first byte, which costs a whole
        read of the file first; a chunked upload (POST, one streamed PATCH, PUT ?digest=) learns
        the digest as the bytes go out. The registry checks the digest at the PUT, so a changed
        or corrupt file is refused there, never stored under a wrong name. Retried as a whole.
        """
        body = HashingFileBody(path)

        def attempt() -> dict:
            started = self.check(self.do_request(f"{self.base_url}/blobs/uploads/", "POST",
                                                 headers={"Content-Length": "0"}), "starting a blob upload")
            location = self._location(started)
            patched = self.check(self.do_request(location, "PATCH", data=body,
                                                 headers={"Content-Type": "application/octet-stream"}),
                                 f"uploading {title}", ok=(202,))
            url = oras.utils.append_url_params(self._location(patched), {"digest": body.digest})
            self.check(self.do_request(url, "PUT", headers={"Content-Length": "0"}), f"committing {title}",
                       ok=(201, 204))
            return {"mediaType": media_type, "digest": body.digest, "size": body.size,
                    "annotations": {ANNOTATION_TITLE: title}}

        return self._retrying(f"uploading {title}", attempt)

    def _location(self, response: requests.Response) -> str:
        location = self._get_location(response, self.container)
        if not location:
            raise RegistryError(f"{self._where()} answered the upload without a Location header")
        return location

    def download_blob_verified(self, descriptor: dict, destination: Path, max_bytes: int | None = None) -> Path:
        """Stream a blob to ``destination``; it appears there only if size and sha256 match.

        The declared size bounds the transfer: a registry that sends more is cut off at the first
        byte too many. ``max_bytes`` refuses a blob declared larger before anything is fetched.
        """
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not is_digest(digest):
            raise RegistryError(f"{self._where()}: layer digest {str(digest)[:80]!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{self._where()}: blob {digest[:19]} declares no valid size ({size!r})")
        if max_bytes is not None and size > max_bytes:
            raise RegistryError(f"{self._where()}: blob {digest[:19]} declares {size} bytes, more than the "
                                f"{max_bytes} allowed (--max-bytes)")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".part")

        def attempt() -> Path:
            received = 0
            response = self.check(self.do_request(f"{self.base_url}/blobs/{digest}", "GET", stream=True),
                                  f"downloading blob {digest[:19]}", ok=(200,))
            try:
                with response, open(partial, "wb") as out, HashingWriter(out, threaded=size > THREADED_HASH_BYTES) as sink:
                    for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                        received += len(chunk)
                        if received > size:
                            break
                        sink.put(chunk)
            except requests.RequestException as exc:
                raise TransientError(f"{exc.__class__.__name__} while downloading blob {digest[:19]}") from None
            actual = "sha256:" + sink.hexdigest()
            if received != size or actual != digest:
                partial.unlink(missing_ok=True)
                got = f"more than the {size} bytes declared" if received > size else f"sha256 {actual[:19]} and {received} bytes"
                # A corrupt transfer is retried once more like a dropped connection would be.
                raise CorruptTransferError(f"blob {digest[:19]} arrived with {got}")
            partial.replace(destination)
            return destination

        try:
            return self._retrying(f"downloading blob {digest[:19]}", attempt)
        finally:
            partial.unlink(missing_ok=True)

    # -- manifests ----------------------------------------------------------------------------
    def _explain_missing(self, reference: str) -> str:
        """Distribution answers MANIFEST_UNKNOWN for a missing repository too: the tag list tells which."""
        try:
            response = self.do_request(f"{self.base_url}/tags/list?n=10", "GET")
        except (TransientError, RegistryError):
            return "the tag list could not be read either"
        with response:
            if response.status_code == 404:
                return f"repository {self.image.repository} does not exist on registry {self.image.registry}"
            if response.status_code != 200:
                return f"the tag list answered HTTP {response.status_code}"
            try:
                tags = [str(t)[:128] for t in (parse_json_object(response.content, "tag list").get("tags") or [])]
            except (RegistryError, TypeError):
                tags = []
        shown = ", ".join(tags[:10]) if tags else "none"
        return f"repository {self.image.repository} exists but has no {reference!r} (tags: {shown})"

    def put_manifest(self, manifest_bytes: bytes, reference: str, media_type: str = OCI_MANIFEST) -> str:
        """PUT exactly these bytes under a tag (or digest); returns and checks their digest."""
        digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()

        def attempt() -> None:
            response = self.do_request(f"{self.base_url}/manifests/{reference}", "PUT", data=manifest_bytes,
                                       headers={"Content-Type": media_type})
            self.check(response, f"putting the manifest for {self.image.repo}:{reference}", ok=(200, 201, 202))
            answered = response.headers.get("Docker-Content-Digest")
            if answered and answered != digest:
                raise RegistryError(f"{self._where()} stored the manifest as {answered[:80]}, expected {digest}")

        self._retrying(f"putting the manifest for :{reference}", attempt)
        return digest

    def fetch_manifest(self, reference: str | None = None) -> tuple[dict, str, bytes]:
        """(manifest, digest, raw bytes) for a tag or digest; the digest is computed from the bytes."""
        reference = reference or self.image.reference

        def attempt() -> tuple[bytes, str]:
            response = self.do_request(f"{self.base_url}/manifests/{reference}", "GET",
                                       headers={"Accept": MANIFEST_ACCEPT})
            self.check(response, f"fetching the manifest of {self.image.repo}:{reference}"
                       if not reference.startswith("sha256:") else f"fetching {self.image.repo}@{reference}", ok=(200,))
            return response.content, response.headers.get("Content-Type", "")

        try:
            raw, content_type = self._retrying(f"fetching the manifest of {reference}", attempt)
        except RegistryNotFoundError as exc:
            raise RegistryNotFoundError(f"{exc}; {self._explain_missing(reference)}") from None
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self._where()}: manifest {reference} arrived with digest {digest}")
        manifest = parse_json_object(raw, f"{self._where()}: manifest {reference}")
        manifest.setdefault("mediaType", content_type.split(";")[0].strip())
        return manifest, digest, raw


class HashingFileBody:
    """A request body that streams a file and hashes what it sent; iterating again starts over."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.hasher = hashlib.sha256()
        self.size = 0

    def __len__(self) -> int:
        # requests then sends a Content-Length instead of chunked encoding, which every registry
        # and proxy accepts for a PATCH
        return self.path.stat().st_size

    def __iter__(self) -> Iterator[bytes]:
        self.hasher, self.size = hashlib.sha256(), 0
        with open(self.path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                self.hasher.update(chunk)
                self.size += len(chunk)
                yield chunk

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()
