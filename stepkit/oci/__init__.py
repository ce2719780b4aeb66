"""The registry client every OCI step shares: references, docker-config auth, retries, manifests.

Layout: ``references`` (the one parser, ``api.image_ref``, with StepError), ``credentials``
(docker config files), ``errors`` (exit-code mapping), ``manifests`` (media types, descriptors,
manifest bytes) and ``client`` (``RegistryClient``). Everything public is re-exported here.

Built on oras-py's ``oras.provider.Registry`` (its blob upload session and reference plumbing),
with these things changed because they do not hold up in a pipeline step:

* **Retries.** oras-py retries every exception five times sleeping ``2 + 3**n`` seconds (up to
  83 s), including a wrong password. Here ``do_request`` retries nothing: it turns connection
  errors and 5xx/429 answers into ``TransientError``, and whole operations (upload one blob,
  put one manifest, download one blob) are retried as a unit by the steps' one retry policy
  (``stepkit.retry.call_with_retries``, via ``registry_retries``). A blob upload that died half-way
  is restarted from its POST; a download is restarted and re-hashed. 401/403/404 are never
  retried: they become ``RegistryAuthError`` / ``RegistryNotFoundError`` naming the registry and
  repository. Errors never contain credentials. Exit codes: failures that outlast the retries
  (``RegistryUnavailableError``) are a ``RetryableError``, exit 1, so the pipeline tries the step
  again later; 4xx, auth, TLS and corrupt blobs (a digest that is wrong on every attempt) stay exit 2.
* **Auth.** The registry's own challenge (the first 401's ``WWW-Authenticate``; no ``GET /v2/``
  probe) picks the scheme: ``Basic`` (htpasswd registries; oras-py's "basic" backend, which crashes without credentials, so that case becomes a
  clear error first) or ``Bearer`` (ACR, GHCR, distribution token auth). Tokens are requested by
  ``RegistryClient.request_token``: with the request timeout (oras-py sets none), 5xx/timeouts as
  ``TransientError`` like every other request, 401/403 as ``RegistryAuthError``, and a new token
  whenever a 401 names a scope the current token lacks (oras-py would resend the stale pull-only
  token to a push endpoint). Credentials come only from the docker config file given (the mounted
  ``imagePushSecret``), never from ``~/.docker/config.json``, and never go to a plain-http token
  realm of an https registry. Basic credentials are sent with every request once the challenge is
  known (a push starts with a bodiless ``POST``), so a 50 MiB PUT is not sent twice.
* **Manifests.** oras-py's ``push()`` cannot set OCI 1.1 ``artifactType`` and serialises the
  manifest itself, so the digest is unknown until the registry answers. ``put_manifest`` uploads
  bytes we serialised, so the digest is ``sha256(bytes)`` before the PUT and is checked against
  ``Docker-Content-Digest`` and by fetching the manifest back.
* **Streaming and limits.** Blobs are uploaded from an open file (not read into memory) and
  downloaded in 1 MiB chunks, hashed on the fly, cut off past their declared size and renamed into
  place only when the sha256 matches. Every other answer (manifests, tag lists, tokens, errors) is
  read with a cap (4 MiB, distribution's own manifest limit), so a hostile registry cannot make a
  step buffer an endless body.
"""

from stepkit.oci.client import (
    MAX_BODY_BYTES,
    HashingFileBody,
    RegistryClient,
    RegistryOptions,
    parse_json_object,
    read_capped,
    registry_retries,
)
from stepkit.oci.credentials import Credentials, credentials_for, load_docker_config
from stepkit.oci.errors import (
    CorruptTransferError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    RegistryUnavailableError,
    TransientError,
)
from stepkit.oci.manifests import (
    ADAPTER_ANNOTATION_PREFIX,
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    CHUNK_BYTES,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_CONFIG_BYTES,
    EVAL_LOSS_ANNOTATION,
    MANIFEST_ACCEPT,
    OCI_EMPTY_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    build_manifest,
    empty_config_descriptor,
    file_descriptor,
    upload_empty_config,
)
from stepkit.oci.references import DIGEST_RE, TAG_RE, ImageRef, is_digest, parse_image

__all__ = [
    "ADAPTER_ANNOTATION_PREFIX",
    "ANNOTATION_CREATED",
    "ANNOTATION_TITLE",
    "CHUNK_BYTES",
    "DIGEST_RE",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "EMPTY_CONFIG_BYTES",
    "EVAL_LOSS_ANNOTATION",
    "MANIFEST_ACCEPT",
    "MAX_BODY_BYTES",
    "OCI_EMPTY_CONFIG",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "TAG_RE",
    "CorruptTransferError",
    "Credentials",
    "HashingFileBody",
    "ImageRef",
    "RegistryAuthError",
    "RegistryClient",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistryOptions",
    "RegistryUnavailableError",
    "TransientError",
    "build_manifest",
    "credentials_for",
    "empty_config_descriptor",
    "file_descriptor",
    "is_digest",
    "load_docker_config",
    "parse_image",
    "parse_json_object",
    "read_capped",
    "registry_retries",
    "upload_empty_config",
]
