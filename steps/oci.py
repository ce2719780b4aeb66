"""The registry client every OCI step shares: references, docker-config auth, retries, manifests.

Built on oras-py's ``oras.provider.Registry`` (its blob upload session, token request and
reference plumbing), with four things changed because they do not hold up in a pipeline step:

* **Retries.** oras-py retries every exception five times sleeping ``2 + 3**n`` seconds (up to
  83 s), including a wrong password. Here ``do_request`` retries nothing: it turns connection
  errors and 5xx/429 answers into ``TransientError``, and whole operations (upload one blob,
  put one manifest, download one blob) are retried as a unit by ``with_retries`` with capped
  exponential backoff. A blob upload that died half-way is restarted from its POST; a download is
  restarted and re-hashed. 401/403/404 are never retried: they become ``RegistryAuthError`` /
  ``RegistryNotFoundError`` naming the registry and repository. Errors never contain credentials.
  Exit codes: failures that outlast the retries (``RegistryUnavailableError``) are a
  ``RetryableError``, exit 1, so the pipeline tries the step again later; 4xx, auth, TLS and
  corrupt blobs (a digest that is wrong on every attempt) stay exit 2.
* **Auth.** The registry's own ``/v2/`` challenge picks the scheme: ``Basic`` (htpasswd
  registries; oras-py's "basic" backend, which crashes without credentials, so that case becomes a
  clear error first) or ``Bearer`` (ACR, GHCR, distribution token auth: oras-py's token backend,
  but a token is re-requested whenever a 401 names a scope the current token lacks; oras-py would
  resend the stale pull-only token to a push endpoint). Credentials come only from the docker
  config file given (the mounted ``imagePushSecret``), never from ``~/.docker/config.json``.
  Basic credentials are sent up front so a 50 MiB PUT is not sent twice.
* **Manifests.** oras-py's ``push()`` cannot set OCI 1.1 ``artifactType`` and serialises the
  manifest itself, so the digest is unknown until the registry answers. ``put_manifest`` uploads
  bytes we serialised, so the digest is ``sha256(bytes)`` before the PUT and is checked against
  ``Docker-Content-Digest`` and by fetching the manifest back.
* **Streaming.** Blobs are uploaded from an open file (not read into memory) and downloaded in
  1 MiB chunks, hashed on the fly and renamed into place only when the sha256 matches.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import oras.auth.utils
import oras.container
import oras.provider
import requests

from steps.common import RetryableError, StepError

log = logging.getLogger("kaiflow.steps.oci")

# Media types --------------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
OCI_EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG_BYTES = b"{}"

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE_RE = re.compile(
    rf"^(?P<registry>{_HOST})/(?P<repository>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)

CHUNK_BYTES = 1 << 20


# Errors -------------------------------------------------------------------------------------
class RegistryError(StepError):
    """A registry operation failed; the message names registry and repository, never a secret."""


class RegistryAuthError(RegistryError):
    """401/403, or the registry wants credentials the docker config does not have."""


class RegistryNotFoundError(RegistryError):
    """404: repository, tag, manifest or blob unknown to the registry."""


class RegistryUnavailableError(RegistryError, RetryableError):
    """Connection errors or 5xx answers outlasted every retry: exit 1, the pipeline tries again later."""


class TransientError(Exception):
    """A failure worth retrying (connection refused/reset, timeout, 5xx, 429)."""


class CorruptTransferError(TransientError):
    """A blob arrived with the wrong size or digest: retried like a dropped connection, but when
    every attempt ends so, the registry's copy is corrupt and retrying the step will not help."""


# References ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """``registry/repository[:tag][@sha256:...]``; the registry host is required."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "--image") -> ImageRef:
        text = text.strip()
        for scheme in ("oci://", "docker://"):
            text = text.removeprefix(scheme)
        match = REFERENCE_RE.match(text)
        if not match:
            raise StepError(
                f"{what} {text!r} is not an image reference of the form "
                "registry.example.com/repository[:tag][@sha256:<64 hex>] (the registry host is required, "
                "repository names are lower case)"
            )
        registry = match["registry"]
        first = registry.split(":")[0]
        if "." not in first and ":" not in registry and first != "localhost":
            raise StepError(f"{what} {text!r}: the first part {registry!r} is not a registry host "
                            "(it needs a dot or a port, e.g. myacr.azurecr.io or 127.0.0.1:5000)")
        return cls(registry, match["repository"], match["tag"], match["digest"])

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        if self.digest:
            return self.digest
        if self.tag:
            return self.tag
        raise ValueError(f"{self} has neither tag nor digest")

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, self.tag, digest)

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.repo
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


# Docker config ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """One registry's entry from a docker config; secrets stay out of repr."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    @property
    def basic(self) -> bool:
        return bool(self.username) and self.password is not None


def _normalise_host(key: str) -> str:
    host = re.sub(r"^[a-z]+://", "", key.strip()).split("/")[0]
    return {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}.get(host, host)


def load_docker_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.dockerconfigjson`` (or ``~/.docker/config.json``-style) file.

    A directory is taken as a mounted Secret: its ``.dockerconfigjson`` (or ``config.json``) is read.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (".dockerconfigjson", "config.json") if (path / name).is_file()]
        if not found:
            raise StepError(f"--docker-config {path}: directory without .dockerconfigjson or config.json")
        path = found[0]
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StepError(f"--docker-config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StepError(f"--docker-config {path}: cannot read: {exc.__class__.__name__}") from None
    except json.JSONDecodeError as exc:
        # The position only: the document holds secrets, so no excerpt of it goes into the error.
        raise StepError(f"--docker-config {path}: not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("auths", {}), dict):
        raise StepError(f"--docker-config {path}: expected a JSON object with an 'auths' object")
    return document


def credentials_for(document: dict[str, Any], registry: str, source: str = "docker config") -> Credentials | None:
    """The entry of ``auths`` whose key names ``registry`` (scheme, path and localhost/127.0.0.1 ignored)."""
    wanted = {_normalise_host(registry)}
    wanted |= {h.replace("localhost", "127.0.0.1") for h in wanted} | {h.replace("127.0.0.1", "localhost") for h in wanted}
    for key, entry in document.get("auths", {}).items():
        if _normalise_host(key) not in wanted:
            continue
        if not isinstance(entry, dict):
            raise StepError(f"{source}: auths[{key!r}] must be an object")
        if entry.get("registrytoken"):
            return Credentials(registry_token=str(entry["registrytoken"]))
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise StepError(f"{source}: auths[{key!r}].auth is not base64 of 'username:password'") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise StepError(f"{source}: auths[{key!r}].auth decodes to no 'username:password' pair")
            return Credentials(username=username, password=password)
        if entry.get("identitytoken"):
            # ACR/`docker login` refresh tokens: sent as the password of the token request.
            return Credentials(username=entry.get("username") or "00000000-0000-0000-0000-000000000000",
                               password=str(entry["identitytoken"]))
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(username=str(entry["username"]), password=str(entry["password"]))
        raise StepError(f"{source}: auths[{key!r}] has none of auth, username+password, identitytoken, registrytoken")
    return None


# Options ------------------------------------------------------------------------------------
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
        "help": "socket timeout of one request in seconds"})


T = TypeVar("T")


def with_retries(what: str, operation: Callable[[], T], options: RegistryOptions, registry: str) -> T:
    """Run ``operation`` until it stops raising TransientError, at most ``options.attempts`` times."""
    attempts = max(1, options.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except TransientError as exc:
            if attempt == attempts:
                error = RegistryError if isinstance(exc, CorruptTransferError) else RegistryUnavailableError
                raise error(f"{what} failed on registry {registry} after {attempts} attempts: {exc}") from None
            delay = min(30.0, options.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# Client -------------------------------------------------------------------------------------
def _error_text(response: requests.Response) -> str:
    """The registry's OCI error codes/messages (they never contain our credentials)."""
    try:
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)]
        if parts:
            return "; ".join(parts)
    except ValueError:
        pass
    return response.reason or f"HTTP {response.status_code}"


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
        scheme_backend = self._probe_auth_scheme()
        super().__init__(hostname=image.registry, insecure=self.options.insecure, auth_backend=scheme_backend)
        self._bearer: str | None = None
        if self.credentials and self.credentials.basic:
            self.auth.set_basic_auth(self.credentials.username, self.credentials.password)
        if self.credentials and self.credentials.registry_token:
            self._bearer = self.credentials.registry_token
        self.container = oras.container.Container(f"{image.repository}:{image.tag or 'latest'}", registry=image.registry)

    # -- where and who ------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{'http' if self.options.insecure else 'https'}://{self.image.registry}/v2/{self.image.repository}"

    def _where(self) -> str:
        return f"registry {self.image.registry}, repository {self.image.repository}"

    def _probe_auth_scheme(self) -> str:
        """GET /v2/ once (with retries): its WWW-Authenticate says Basic or Bearer."""
        scheme = "http" if self.options.insecure else "https"
        url = f"{scheme}://{self.image.registry}/v2/"

        def probe() -> requests.Response:
            try:
                response = requests.get(url, timeout=self.options.timeout_s)
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"TLS error talking to registry {self.image.registry}: {exc.__class__.__name__}"
                                    " (use --insecure only for a plain-http registry)") from None
            except requests.RequestException as exc:
                raise TransientError(f"{exc.__class__.__name__} connecting to {url}") from None
            if response.status_code >= 500 or response.status_code == 429:
                raise TransientError(f"HTTP {response.status_code} from {url}")
            return response

        response = with_retries("contacting the registry", probe, self.options, self.image.registry)
        challenge = response.headers.get("WWW-Authenticate", "")
        self._challenge_scheme = challenge.split(" ", 1)[0].lower() if response.status_code == 401 else ""
        if self._challenge_scheme == "basic":
            if not (self.credentials and self.credentials.basic):
                where = f"--docker-config {self.options.docker_config}" if self.options.docker_config else "no --docker-config given"
                raise RegistryAuthError(f"{self._where()} requires a username and password (HTTP Basic) and there are "
                                        f"none for {self.image.registry} ({where})")
            return "basic"
        return "token"

    # -- requests -----------------------------------------------------------------------------
    def _auth_header(self) -> dict[str, str]:
        if self._challenge_scheme == "basic":
            return self.auth.get_auth_header()
        if self._bearer:
            return {"Authorization": f"Bearer {self._bearer}"}
        return {}

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any, json_body: Any, stream: bool):
        if hasattr(data, "seek"):
            data.seek(0)
        try:
            response = self.session.request(method, url, data=data, json=json_body, headers=headers, stream=stream,
                                            timeout=self.options.timeout_s, verify=self._tls_verify,
                                            allow_redirects=True)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"TLS error talking to {self._where()}: {exc.__class__.__name__}") from None
        except requests.RequestException as exc:
            raise TransientError(f"{exc.__class__.__name__} during {method} {url.split('?')[0]}") from None
        if response.status_code >= 500 or response.status_code == 429:
            text = _error_text(response)
            response.close()
            raise TransientError(f"HTTP {response.status_code} ({text}) for {method} {url.split('?')[0]}")
        return response

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict | None = None,
                   json: Any = None, stream: bool = False) -> requests.Response:
        """One request; one re-authentication on 401; TransientError for what is worth retrying."""
        headers = dict(headers or {})
        headers.update(self._auth_header())
        response = self._send(method, url, headers, data, json, stream)
        if response.status_code == 401 and self._challenge_scheme != "basic":
            challenge = oras.auth.utils.parse_auth_header(response.headers.get("WWW-Authenticate", ""))
            if challenge.realm and (self.credentials is None or not self.credentials.registry_token):
                # Always ask again: the challenge names the scope this request needs (pull vs push).
                token = self.auth.request_token(challenge)
                if token:
                    self._bearer = token
                    headers.update(self._auth_header())
                    response.close()
                    response = self._send(method, url, headers, data, json, stream)
        return response

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
    def blob_exists_digest(self, digest: str) -> bool:
        response = self.do_request(f"{self.base_url}/blobs/{digest}", "HEAD")
        response.close()
        if response.status_code in (401, 403):
            self.check(response, f"checking blob {digest[:19]}")
        return response.status_code == 200

    def put_upload(self, blob: str, container: Any, layer: dict) -> requests.Response:
        """POST + monolithic PUT streamed from the file (oras-py reads the whole blob into memory)."""
        response = self.check(self.do_request(f"{self.base_url}/blobs/uploads/", "POST",
                                              headers={"Content-Length": "0"}), "starting a blob upload")
        location = self._get_location(response, container)
        if not location:
            raise RegistryError(f"{self._where()} answered the upload POST without a Location header")
        url = oras.utils.append_url_params(location, {"digest": layer["digest"]})
        headers = {"Content-Length": str(layer["size"]), "Content-Type": "application/octet-stream"}
        with open(blob, "rb") as body:
            return self.do_request(url, "PUT", data=body, headers=headers)

    def upload_file(self, path: str | os.PathLike[str], descriptor: dict, name: str | None = None) -> None:
        """Upload one blob (skipped when the registry has it), retried as a whole."""
        name = name or descriptor.get("annotations", {}).get(ANNOTATION_TITLE, descriptor["digest"][:19])

        def attempt() -> None:
            if self.blob_exists_digest(descriptor["digest"]):
                log.info("blob %s (%s) already in the registry", name, descriptor["digest"][:19])
                return
            self.check(self.put_upload(str(path), self.container, descriptor), f"uploading {name}", ok=(201, 202, 204))

        with_retries(f"uploading {name}", attempt, self.options, self.image.registry)

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

        return with_retries(f"uploading {title}", attempt, self.options, self.image.registry)

    def _location(self, response: requests.Response) -> str:
        location = self._get_location(response, self.container)
        if not location:
            raise RegistryError(f"{self._where()} answered the upload without a Location header")
        return location

    def download_blob_verified(self, descriptor: dict, destination: Path) -> Path:
        """Stream a blob to ``destination``; it appears there only if size and sha256 match."""
        digest = descriptor["digest"]
        if not DIGEST_RE.match(digest):
            raise RegistryError(f"{self._where()}: layer digest {digest!r} is not a sha256 digest")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".part")

        def attempt() -> Path:
            hasher = hashlib.sha256()
            size = 0
            response = self.check(self.do_request(f"{self.base_url}/blobs/{digest}", "GET", stream=True),
                                  f"downloading blob {digest[:19]}", ok=(200,))
            try:
                with response, open(partial, "wb") as out:
                    for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                        hasher.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            except requests.RequestException as exc:
                raise TransientError(f"{exc.__class__.__name__} while downloading blob {digest[:19]}") from None
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest or ("size" in descriptor and size != descriptor["size"]):
                partial.unlink(missing_ok=True)
                # A corrupt transfer is retried once more like a dropped connection would be.
                raise CorruptTransferError(f"blob {digest[:19]} arrived with sha256 {actual[:19]} and {size} bytes")
            partial.replace(destination)
            return destination

        try:
            return with_retries(f"downloading blob {digest[:19]}", attempt, self.options, self.image.registry)
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
                tags = response.json().get("tags") or []
            except ValueError:
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
                raise RegistryError(f"{self._where()} stored the manifest as {answered}, expected {digest}")

        with_retries(f"putting the manifest for :{reference}", attempt, self.options, self.image.registry)
        return digest

    def fetch_manifest(self, reference: str | None = None) -> tuple[dict, str, bytes]:
        """(manifest, digest, raw bytes) for a tag or digest; the digest is computed from the bytes."""
        reference = reference or self.image.reference

        def attempt() -> tuple[dict, str, bytes]:
            response = self.do_request(f"{self.base_url}/manifests/{reference}", "GET",
                                       headers={"Accept": MANIFEST_ACCEPT})
            self.check(response, f"fetching the manifest of {self.image.repo}:{reference}"
                       if not reference.startswith("sha256:") else f"fetching {self.image.repo}@{reference}", ok=(200,))
            raw = response.content
            return raw, response.headers.get("Content-Type", "")

        try:
            raw, content_type = with_retries(f"fetching the manifest of {reference}", attempt, self.options,
                                             self.image.registry)
        except RegistryNotFoundError as exc:
            raise RegistryNotFoundError(f"{exc}; {self._explain_missing(reference)}") from None
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{self._where()}: manifest {reference} arrived with digest {digest}")
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise RegistryError(f"{self._where()}: manifest {reference} is not JSON") from None
        if not isinstance(manifest, dict):
            raise RegistryError(f"{self._where()}: manifest {reference} is not a JSON object")
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


# Manifest building --------------------------------------------------------------------------
def file_descriptor(path: Path, media_type: str, title: str | None = None) -> dict:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    descriptor = {"mediaType": media_type, "digest": "sha256:" + hasher.hexdigest(), "size": size}
    if title is not None:
        descriptor["annotations"] = {ANNOTATION_TITLE: title}
    return descriptor


def empty_config_descriptor() -> dict:
    return {"mediaType": OCI_EMPTY_CONFIG, "digest": "sha256:" + hashlib.sha256(EMPTY_CONFIG_BYTES).hexdigest(),
            "size": len(EMPTY_CONFIG_BYTES), "data": base64.b64encode(EMPTY_CONFIG_BYTES).decode()}


def build_manifest(layers: Sequence[dict], artifact_type: str, annotations: dict[str, str],
                   config: dict | None = None) -> bytes:
    """An OCI 1.1 image manifest with ``artifactType``, serialised once (its bytes define the digest)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config or empty_config_descriptor(),
        "layers": list(layers),
        "annotations": dict(sorted(annotations.items())),
    }
    return json.dumps(manifest, separators=(",", ":")).encode()
