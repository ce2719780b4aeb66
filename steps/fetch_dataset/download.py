"""Fetch one dataset URL to a local file: streamed, size-capped, hashed, resumed after a drop.

``http``/``https`` bodies are streamed with httpx, as received, into ``<dest>.part``, so memory
stays flat whatever the file size. When the connection drops mid-body (or times out), the next
attempt asks for the rest with ``Range: bytes=<have>-`` and ``If-Range: <ETag or Last-Modified>``:
a server that honours it answers 206 and the file simply grows; one that does not (or whose file
changed) answers 200 and the download restarts from zero. The byte cap is enforced twice: on the
announced ``Content-Length`` before reading anything, and on the bytes actually received.

The sha256 of the complete file is computed on a worker thread (``Fetched.sha256`` waits for it),
not while receiving: on a VM hashing at ~500 MB/s, that held a 1 GB local download to 0.77x a
plain one; read back from the page cache it overlaps with the step's row parsing instead. A
streamed parquet file (below) is hashed on that thread too, reading the file behind the download.

Attempts follow the steps' one retry policy (``stepkit.retry.call_with_retries``), and only for
failures that may pass. Every exception is classified once, by ``classify``:

* transient (retried here, then ``RetryableError``, exit 1, so the pipeline retries the step):
  HTTP 408/429/5xx, refused/reset/dropped connections, timeouts, a proxy that cannot be reached,
  a full local disk;
* permanent (``StepError``, exit 2, at once): other 4xx, a redirect to a non-http scheme
  (``file:``, ``ftp:``), a redirect loop, an invalid URL or header, a body that cannot be decoded,
  an unreadable local file;
* anything else is a bug or an input nobody foresaw: exit 2 at once with its class name, never
  retried as if it were a network blip.

URLs in messages and logs are redacted (``stepkit.redaction``): signed query strings stay secret.

``file://`` URLs are not copied: the file is hashed in place (same cap) and read where it lies.

With a ``stream`` (a :class:`~steps.fetch_dataset.streaming.ParquetStream`, for URLs declared
parquet) the download also reads the file's footer with a second, suffix ``Range`` request before
the body, and reports its progress so that row groups are decoded while the rest downloads
(``streaming``'s docstring says when and how it falls back).
"""

from __future__ import annotations

import errno
import http
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.fetch_dataset.egress import EgressPolicy, EgressRefused, guarded_client_args
from steps.fetch_dataset import streaming
from steps.fetch_dataset.streaming import ParquetStream, footer_length, read_footer
from stepkit.common import RetryableError, StepError
from stepkit.redaction import redact_text, redact_url
from stepkit.retry import TransientError, call_with_retries

log = logging.getLogger("kaiflow.steps.fetch_dataset")

CHUNK = 1 << 20
READ_BYTES = 1 << 20  # per socket read (read_in_large_pieces)
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
# A full disk may be another node's problem on the pipeline's retry; other OS errors will not pass.
TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR}


@dataclass(frozen=True)
class Fetched:
    url: str
    path: Path
    digest: Future[str] | str  # the sha256 hex, or the worker computing it
    size: int
    content_type: str | None
    attempts: int = 1

    @property
    def sha256(self) -> str:
        return self.digest if isinstance(self.digest, str) else self.digest.result()


_hasher: ThreadPoolExecutor | None = None


def hash_in_background(path: Path | None = None, chunks: Iterator[bytes] | None = None) -> Future[str]:
    """The sha256 of ``path`` (or of ``chunks``: a streamed file's bytes as they download), computed
    on a worker thread (hashlib releases the GIL)."""
    global _hasher
    if _hasher is None:
        _hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")

    def read(path: Path) -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def digest() -> str:
        sha = hashlib.sha256()
        for chunk in chunks if chunks is not None else read(path):
            sha.update(chunk)
        return sha.hexdigest()

    return _hasher.submit(digest)


def read_in_large_pieces(transport) -> None:
    """Make ``transport`` (an ``httpx.HTTPTransport``) ask the socket for up to ``READ_BYTES`` per
    read instead of httpcore's 64 KiB.

    Each read takes the GIL back; on a fast download whose row groups are decoded meanwhile
    (``streaming``) the download thread waited for it between every 64 KiB: a 1 GB loopback
    download beside the decoding took 4.5 s instead of 1.2 s, 2.7 s with 1 MiB reads (and 0.97 s
    instead of 1.18 s alone). TLS sockets still return one record (16 KiB) per read. Done with a
    network backend around the pool's own (httpcore's extension point, the same hook the egress
    policy uses); left as it is if a later httpx lays its pool out differently.
    """
    import httpcore  # noqa: PLC0415 - as httpx (0.1 s): imported only when a download starts

    pool = getattr(transport, "_pool", None)
    inner = getattr(pool, "_network_backend", None)
    if inner is None:
        return

    class Stream(httpcore.NetworkStream):
        def __init__(self, stream: Any) -> None:
            self._stream = stream

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._stream.read(max(max_bytes, READ_BYTES), timeout)

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._stream.write(buffer, timeout)

        def close(self) -> None:
            self._stream.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                      timeout: float | None = None) -> Stream:
            return Stream(self._stream.start_tls(ssl_context, server_hostname, timeout))

        def get_extra_info(self, info: str) -> Any:
            return self._stream.get_extra_info(info)

    class Backend(httpcore.NetworkBackend):
        def connect_tcp(self, *args: Any, **kwargs: Any) -> Stream:
            return Stream(inner.connect_tcp(*args, **kwargs))

        def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Stream:
            return Stream(inner.connect_unix_socket(*args, **kwargs))

        def sleep(self, seconds: float) -> None:
            inner.sleep(seconds)

    pool._network_backend = Backend()  # noqa: SLF001


class Stopped(StepError):
    """The download was asked to stop (``fetch(stop=...)``); not an error of the URL."""


class _Transient(TransientError):
    """One failed attempt worth another; its message is already redacted."""


def classify(exc: BaseException, url: str) -> StepError:
    """The step error an exception stands for: ``RetryableError`` (exit 1) or ``StepError`` (exit 2)."""
    import httpx

    where = f"url {redact_url(url)!r}"
    if isinstance(exc, EgressRefused) and not str(exc).startswith("url "):
        return EgressRefused(f"{where}: {exc}")
    if isinstance(exc, StepError):
        return exc
    if isinstance(exc, _Transient):
        return RetryableError(f"{where}: {exc}")
    if isinstance(exc, httpx.TooManyRedirects):
        return StepError(f"{where}: redirect loop or too many redirects ({_describe(exc)})")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return StepError(f"{where}: redirected to a URL that is not http or https ({_describe(exc)})")
    if isinstance(exc, httpx.LocalProtocolError | httpx.InvalidURL | httpx.DecodingError):
        return StepError(f"{where}: {_describe(exc)}")
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
        return RetryableError(f"{where}: {_describe(exc)}")
    if isinstance(exc, OSError):
        kind = RetryableError if exc.errno in TRANSIENT_ERRNOS else StepError
        return kind(f"{where}: local file error: {_describe(exc)}")
    return StepError(f"{where}: unexpected {_describe(exc)}")


def _is_transient(exc: BaseException) -> bool:
    import httpx

    if isinstance(exc, httpx.UnsupportedProtocol):  # a TransportError, but a redirect to file: never passes
        return False
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _describe(exc: BaseException) -> str:
    text = redact_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch(
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    timeout_s: float = 30.0,
    retries: int = 4,
    backoff_s: float = 0.5,
    transport=None,
    policy: EgressPolicy | None = None,
    stop: threading.Event | None = None,
    stream: ParquetStream | None = None,
) -> Fetched:
    """Download ``url`` (or locate a ``file:`` URL); ``transport`` is an httpx transport for tests.

    ``policy`` (in a cluster): public addresses only, checked at every connection (``egress``).
    ``stop``: once set, the download gives up (:class:`Stopped`) at its next chunk or attempt, e.g.
    when the step failed on an earlier file while this one was still downloading.
    ``stream``: see the module docstring; the caller marks it failed if this raises.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    try:
        if policy is not None:
            policy.check_url(url)
        if scheme == "file":
            return _local(url, max_bytes)
        if scheme in ("http", "https"):
            return _Download(url, dest, max_bytes, timeout_s, transport, policy, stop, stream).run(retries, backoff_s)
    except Exception as exc:
        raise classify(exc, url) from None
    raise StepError(f"url {redact_url(url)!r}: unsupported scheme {scheme or '(none)'!r} (use http, https or file)")


def _local(url: str, max_bytes: int) -> Fetched:
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    if not path.is_file():
        raise StepError(f"url {redact_url(url)!r}: no such file {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise StepError(f"url {redact_url(url)!r}: {size} bytes exceeds the size cap of {max_bytes} bytes (--max-bytes)")
    return Fetched(url, path, hash_in_background(path), size, None)


class _Download:
    """One HTTP download; ``attempt`` is called once per try and resumes what earlier tries got."""

    def __init__(self, url: str, dest: Path, max_bytes: int, timeout_s: float, transport,
                 policy: EgressPolicy | None = None, stop: threading.Event | None = None,
                 stream: ParquetStream | None = None) -> None:
        self.url, self.shown, self.dest, self.max_bytes = url, redact_url(url), dest, max_bytes
        self.timeout_s, self.transport, self.policy, self.stop = timeout_s, transport, policy, stop
        self.stream = stream
        self.part = dest.with_name(dest.name + ".part")
        self.have = 0
        self.validator: str | None = None
        self.content_type: str | None = None
        self.attempts = 0
        self._digest: Future[str] | None = None  # a streamed file is hashed behind its download

    def run(self, retries: int, backoff_s: float) -> Fetched:
        import httpx

        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.part.unlink(missing_ok=True)
        if self.policy is not None:
            args = guarded_client_args(self.policy, self.timeout_s)
        else:
            args = {"timeout": httpx.Timeout(self.timeout_s), "follow_redirects": True,
                    "transport": self.transport or httpx.HTTPTransport()}
        if isinstance(args["transport"], httpx.HTTPTransport):
            read_in_large_pieces(args["transport"])
        fetched: Fetched | None = None
        with httpx.Client(**args) as client:
            try:
                fetched = call_with_retries(lambda: self.attempt(client), what=self.shown, attempts=retries + 1,
                                            backoff_s=backoff_s, retry_on=(_Transient,))
                return fetched
            except _Transient as exc:
                raise RetryableError(f"url {self.shown!r}: failed after {self.attempts} attempts, last error: {exc}") from None
            finally:
                self.part.unlink(missing_ok=True)
                if self.stream is not None and fetched is not None:
                    self.stream.finish()
                elif self.stream is not None:  # a reader or hasher waiting for bytes stops waiting
                    self.stream.fail()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"url {self.shown!r}: download stopped after {self.have} bytes")

    def attempt(self, client) -> Fetched:
        self._check_stop()
        self.attempts += 1
        try:
            return self._get(client)
        except Exception as exc:
            if _is_transient(exc):
                raise _Transient(f"{_describe(exc)} after {self.have} bytes") from None
            raise

    def _get(self, client) -> Fetched:
        import httpx

        headers = {"Accept-Encoding": "identity"}  # byte offsets must refer to the stored file
        if self.have and self.validator:
            headers["Range"] = f"bytes={self.have}-"
            headers["If-Range"] = self.validator
        with client.stream("GET", self.url, headers=headers) as response:
            status = response.status_code
            if status in RETRYABLE_STATUS:
                raise _Transient(f"HTTP {status} {_phrase(status)}")
            if status >= 300:  # a 3xx here is one httpx did not follow (no Location, 304, ...)
                raise StepError(f"url {self.shown!r}: HTTP {status} {_phrase(status)}")
            if status == 206 and self.have:
                log.info("%s: resuming at byte %d", self.shown, self.have)
            else:  # 200: a full body, whatever we had before
                if self.have and self.stream is not None and self.stream.metadata is not None:
                    raise RetryableError(f"url {self.shown!r}: the file changed on the server during the download "
                                         "(a resumed request got the whole file again) while its row groups were being read")
                if self.have:  # an empty .part stays as it is: a streamed file's reader holds a link to it
                    self.part.unlink(missing_ok=True)
                self.have = 0
            self.content_type = response.headers.get("content-type", self.content_type)
            self.validator = response.headers.get("etag") or response.headers.get("last-modified")
            if response.headers.get("accept-ranges", "").lower() != "bytes" and status != 206:
                self.validator = None  # the server cannot resume: a retry restarts from zero
            announced = _announced_total(response, self.have)
            if announced is not None and announced > self.max_bytes:
                raise StepError(
                    f"url {self.shown!r}: {announced} bytes exceeds the size cap of {self.max_bytes} bytes (--max-bytes)"
                )
            with self.part.open("ab") as out:
                stream = self.stream
                if stream is not None and stream.metadata is None:
                    stream = self._start_stream(client, response, announced)
                for chunk in response.iter_raw():  # as received: a drop keeps what came
                    self._check_stop()
                    self.have += len(chunk)
                    if self.have > self.max_bytes:
                        raise StepError(
                            f"url {self.shown!r}: more than {self.max_bytes} bytes received, over the size cap (--max-bytes)"
                        )
                    out.write(chunk)
                    if stream is not None:
                        out.flush()  # the reader reads the file, not this buffer
                        stream.advance(self.have)
            if announced is not None and self.have < announced:
                raise httpx.RemoteProtocolError(f"body ended at byte {self.have} of {announced}")
        if self.stream is not None and self.stream.metadata is not None:
            self._check_tail()
        self.part.replace(self.dest)
        digest = self._digest if self._digest is not None else hash_in_background(self.dest)
        return Fetched(self.url, self.dest, digest, self.have, _media_type(self.content_type), self.attempts)

    def _start_stream(self, client, response, announced: int | None) -> ParquetStream | None:
        """Read the footer of the file ``response`` (a 200, body not read yet) is sending, and make
        the stream ready; None (and the stream stays unused) when the server or the file does not allow it."""
        validator = response.headers.get("etag") or response.headers.get("last-modified")
        if (response.status_code != 200 or announced is None or announced < streaming.STREAM_MIN_BYTES
                or not validator or response.headers.get("accept-ranges", "").lower() != "bytes"):
            return None
        try:
            tail = self._suffix(client, min(streaming.TAIL_BYTES, announced), validator, announced)
            needed = footer_length(tail) if tail is not None else None
            if needed is not None and len(tail) < needed <= min(streaming.MAX_FOOTER_BYTES, announced):
                tail = self._suffix(client, needed, validator, announced)
            if tail is None or needed is None or len(tail) < needed:
                return None
            metadata = read_footer(tail, announced)
            link = self.dest.with_name(self.dest.name + ".stream")
            link.unlink(missing_ok=True)
            os.link(self.part, link)  # the reader keeps its path when .part is renamed on completion
        except Exception as exc:  # an optimisation only: any trouble and the file is read once complete
            if isinstance(exc, EgressRefused | Stopped):
                raise
            log.debug("%s: row groups are decoded after the download (%s)", self.shown, _describe(exc))
            return None
        self.stream.start(link, announced, tail, metadata)
        self._digest = hash_in_background(chunks=self.stream.follow())
        log.debug("%s: decoding %d row groups as they arrive", self.shown, metadata.num_row_groups)
        return self.stream

    def _suffix(self, client, length: int, validator: str, size: int) -> bytes | None:
        """The file's last ``length`` bytes, if the server sends exactly those of the same version."""
        headers = {"Accept-Encoding": "identity", "Range": f"bytes=-{length}", "If-Range": validator}
        with client.stream("GET", self.url, headers=headers) as response:
            expected = f"bytes {size - length}-{size - 1}/{size}"
            if response.status_code != 206 or response.headers.get("content-range", "").strip() != expected:
                return None  # a 200 is the whole file: closed unread
            data = bytearray()
            for chunk in response.iter_raw():
                data += chunk
                if len(data) > length:
                    return None
        return bytes(data) if len(data) == length else None

    def _check_tail(self) -> None:
        """The downloaded file must end with the tail whose footer the reader used."""
        tail = self.stream.tail
        with self.part.open("rb") as f:
            f.seek(max(0, self.have - len(tail)))
            if self.have != self.stream.size or f.read() != tail:
                raise RetryableError(f"url {self.shown!r}: the file changed on the server during the download "
                                     "(its end no longer matches the parquet footer read first)")


def _phrase(status: int) -> str:
    """The standard reason phrase: the server's own is text it chose, never echoed."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


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
