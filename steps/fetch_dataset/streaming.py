"""Decode one parquet file's row groups while the rest of it is still downloading.

Parquet keeps its metadata (the footer) at the end of the file, so the row groups of a file can be
decoded in download order only once the footer is known. For a URL whose type is declared parquet
(its extension, or Kaito's ``dataset_extension``), the download (``download._Download``) does this
when the server allows it:

1. the ``GET`` of the whole file answers 200 with ``Accept-Ranges: bytes``, a ``Content-Length``
   of at least ``STREAM_MIN_BYTES`` and a validator (``ETag`` or ``Last-Modified``);
2. before reading that body, a second request on another connection asks for the file's last
   ``TAIL_BYTES`` (``Range: bytes=-N``, ``If-Range: <validator>``, so that a changed file answers
   200 and nothing is streamed); a larger footer is asked for once more at its own size (up to
   ``MAX_FOOTER_BYTES``);
3. the footer is parsed (:func:`read_footer`) and the stream is *ready*: the reader decodes row
   group ``g`` as soon as the download has written every byte up to the end of ``g``'s column chunks
   (:meth:`ParquetStream.wait_for`), each group from a fresh ``ParquetFile`` opened on a hard link to
   the growing file with the footer's metadata, while the download goes on;
4. when the body is complete its last bytes must equal the tail read in step 2 — the rows read
   came from the file the footer describes — or the step fails as retryable (the file changed on the
   server between the two requests). A download that restarts from zero after rows were read (a
   resume refused with 200) fails the same way.

Anything else (no ranges, no validator, a 200 to the suffix request, a footer that does not parse,
a file system without hard links) falls back, silently, to decoding the file once it is complete.
The rows, the split and every cap are the same either way; only when decoding starts changes.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Smaller files are read once complete: their download is over in moments anywhere, and the second
# request would cost more than it saves.
STREAM_MIN_BYTES = 16 << 20
TAIL_BYTES = 64 << 10
NOTIFY_BYTES = 1 << 20
MAX_FOOTER_BYTES = 16 << 20
PARQUET_MAGIC = b"PAR1"


class StreamBroken(Exception):
    """The download behind a stream failed or the step gave up on it; the download's own error
    (``_Downloads.result``) says why. Deliberately neither ``OSError`` nor an Arrow error, which the
    reader would report as corrupt data."""


def footer_length(tail: bytes) -> int | None:
    """The bytes the footer needs at the end of the file (metadata, its length, the magic), or None
    if ``tail`` does not end like a parquet file."""
    if len(tail) < 12 or not tail.endswith(PARQUET_MAGIC):
        return None
    return struct.unpack("<I", tail[-8:-4])[0] + 8


class _Tail(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only the last ``len(tail)`` are known; the others
    read as zeros. Arrow reads a file's last 64 KiB at once, then parses only the footer at their end
    (which the tail holds: ``footer_length``)."""

    def __init__(self, tail: bytes, size: int) -> None:
        self._tail, self._size, self._pos = tail, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._pos))
        known = self._size - len(self._tail)  # the tail's first byte in the file
        gap = max(0, min(count, known - self._pos))
        view[:gap] = bytes(gap)
        if count > gap:
            start = self._pos + gap - known
            view[gap:count] = self._tail[start:start + count - gap]
        self._pos += count
        return count


def read_footer(tail: bytes, size: int) -> Any:
    """The ``FileMetaData`` of a parquet file of ``size`` bytes that ends with ``tail``."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(_Tail(tail, size)).metadata


def row_group_ends(metadata: Any) -> list[int]:
    """For each row group, the offset just past its last column chunk."""
    ends = []
    for g in range(metadata.num_row_groups):
        group, end = metadata.row_group(g), 0
        for c in range(group.num_columns):
            column = group.column(c)
            start = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                start = min(start, column.dictionary_page_offset)
            end = max(end, start + column.total_compressed_size)
        ends.append(end)
    return ends


class ParquetStream:
    """One parquet download as the reader sees it while it grows.

    The download thread calls :meth:`start` (footer known, growing file linked), :meth:`advance`
    after each chunk is written, then :meth:`finish` or :meth:`fail`; the reader calls
    :meth:`wait_for` before each row group. :meth:`cancel` (the step failed elsewhere) wakes a
    waiting reader too.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.have = 0
        self._next = 0  # the next ``have`` at which waiters are woken
        self._state = "waiting"  # -> "ready" -> "done" | "broken"
        self.size = 0
        self.tail = b""
        self.metadata: Any = None
        self.path: Path | None = None
        self.on_start: Callable[[], None] | None = None  # told when the stream is ready (the reader may begin)

    def start(self, path: Path, size: int, tail: bytes, metadata: Any) -> None:
        self.path, self.size, self.tail, self.metadata = path, size, tail, metadata
        with self._cond:
            self._state = "ready"
        if self.on_start is not None:
            self.on_start()

    def advance(self, have: int) -> None:
        self.have = have
        if have >= self._next:  # waiters are woken every NOTIFY_BYTES, not for every chunk
            with self._cond:
                self._next = have + NOTIFY_BYTES
                self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            if self._state == "ready":
                self._state = "done"
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._state = "broken"
            self._cond.notify_all()

    cancel = fail

    def wait_for(self, end: int) -> None:
        """Wait until bytes ``[0, end)`` are on disk (or the download completed); :class:`StreamBroken`
        if it failed or was cancelled meanwhile."""
        with self._cond:
            while self._state == "ready" and self.have < end:
                self._cond.wait(1.0)
            if self._state == "broken":
                raise StreamBroken("the download of this file did not complete")

    def follow(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in order as they are written, until it is complete (for hashing it
        behind the download); :class:`StreamBroken` if the download fails. The file is opened now:
        its link may be gone (:meth:`close`) before the first chunk is read."""
        assert self.path is not None
        return self._follow(open(self.path, "rb"), chunk)

    def _follow(self, file: Any, chunk: int) -> Iterator[bytes]:
        position = 0
        with file as f:
            while position < self.size:
                self.wait_for(min(position + chunk, self.size))
                data = f.read(min(chunk, self.have - position))
                if not data:  # the download completed short of the size: it fails on its own
                    raise StreamBroken("the download of this file ended early")
                position += len(data)
                yield data

    def close(self) -> None:
        """The reader is done with the growing file: remove its link."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
