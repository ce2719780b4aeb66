"""Fetch one dataset URL to a local file: streamed, size-capped, hashed, resumed after a drop.

``http``/``https`` bodies are streamed with httpx in 1 MiB chunks into ``<dest>.part`` while a
sha256 is updated, so memory stays flat whatever the file size. When the connection drops
mid-body (or times out), the next attempt asks for the rest with ``Range: bytes=<have>-`` and
``If-Range: <ETag or Last-Modified>``: a server that honours it answers 206 and the hash simply
goes on; one that does not (or whose file changed) answers 200 and the download restarts from
zero with a fresh hash. Attempts back off exponentially; 5xx, 408 and 429 are retried, every
other 4xx fails at once with the status in the message. The byte cap is enforced twice: on the
announced ``Content-Length`` before reading anything, and on the bytes actually received.
When every attempt failed (retryable statuses, dropped connections, timeouts) the error is a
``RetryableError`` (exit 1: the pipeline retries the step later); other failures exit 2.

``file://`` URLs are not copied: the file is hashed in place (same cap) and read where it lies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from steps.common import RetryableError, StepError

log = logging.getLogger("kaiflow.steps.fetch_dataset")

CHUNK = 1 << 20
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Fetched:
    url: str
    path: Path
    sha256: str
    size: int
    content_type: str | None
    attempts: int = 1


def fetch(
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    timeout_s: float = 30.0,
    retries: int = 4,
    backoff_s: float = 0.5,
) -> Fetched:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local(url, max_bytes)
    if scheme in ("http", "https"):
        return _http(url, dest, max_bytes=max_bytes, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    raise StepError(f"url {url!r}: unsupported scheme {scheme or '(none)'!r} (use http, https or file)")


def _local(url: str, max_bytes: int) -> Fetched:
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not path.is_file():
        raise StepError(f"url {url!r}: no such file {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise StepError(f"url {url!r}: {size} bytes exceeds the size cap of {max_bytes} bytes (--max-bytes)")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return Fetched(url, path, digest.hexdigest(), size, None)


def _http(url: str, dest: Path, *, max_bytes: int, timeout_s: float, retries: int, backoff_s: float) -> Fetched:
    import httpx  # light, but only the http path needs it

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    digest = hashlib.sha256()
    have = 0
    validator: str | None = None
    content_type: str | None = None
    last_error = ""
    timeout = httpx.Timeout(timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for attempt in range(1, retries + 2):
            if attempt > 1:
                time.sleep(backoff_s * 2 ** (attempt - 2))
            headers = {"Accept-Encoding": "identity"}  # byte offsets must refer to the stored file
            if have and validator:
                headers["Range"] = f"bytes={have}-"
                headers["If-Range"] = validator
            try:
                with client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status in RETRYABLE_STATUS:
                        last_error = f"HTTP {status} {response.reason_phrase}"
                        log.warning("%s: %s (attempt %d of %d)", url, last_error, attempt, retries + 1)
                        continue
                    if status >= 400:
                        raise StepError(f"url {url!r}: HTTP {status} {response.reason_phrase}")
                    if status == 206 and have:
                        log.info("%s: resuming at byte %d", url, have)
                    else:  # 200: a full body, whatever we had before
                        digest, have = hashlib.sha256(), 0
                        part.unlink(missing_ok=True)
                    content_type = response.headers.get("content-type", content_type)
                    validator = response.headers.get("etag") or response.headers.get("last-modified")
                    if response.headers.get("accept-ranges", "").lower() != "bytes" and status != 206:
                        validator = None  # the server cannot resume: a retry restarts from zero
                    announced = _announced_total(response, have)
                    if announced is not None and announced > max_bytes:
                        raise StepError(
                            f"url {url!r}: {announced} bytes exceeds the size cap of {max_bytes} bytes (--max-bytes)"
                        )
                    with part.open("ab") as out:
                        for chunk in response.iter_raw():  # as received: a drop keeps what came
                            have += len(chunk)
                            if have > max_bytes:
                                raise StepError(
                                    f"url {url!r}: more than {max_bytes} bytes received, over the size cap (--max-bytes)"
                                )
                            digest.update(chunk)
                            out.write(chunk)
                    if announced is not None and have < announced:
                        raise httpx.RemoteProtocolError(f"body ended at byte {have} of {announced}")
                    part.replace(dest)
                    return Fetched(url, dest, digest.hexdigest(), have, _media_type(content_type), attempt)
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("%s: %s after %d bytes (attempt %d of %d)", url, last_error, have, attempt, retries + 1)
    part.unlink(missing_ok=True)
    # Only retryable statuses and dropped connections get here: the server may be back later.
    raise RetryableError(f"url {url!r}: failed after {retries + 1} attempts, last error: {last_error}")


def _announced_total(response, have: int) -> int | None:
    """The full file size the response implies, if it says."""
    if response.status_code == 206:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if total.isdigit():
            return int(total)
    length = response.headers.get("content-length")
    if length and length.isdigit():
        return int(length) + (have if response.status_code == 206 else 0)
    return None


def _media_type(content_type: str | None) -> str | None:
    return content_type.split(";", 1)[0].strip().lower() if content_type else None


def safe_name(url: str, index: int) -> str:
    """A file name for a download: its position, then the URL's last path segment."""
    tail = os.path.basename(urllib.parse.urlsplit(url).path) or "data"
    tail = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[:100]
    return f"{index:03d}-{tail}"
