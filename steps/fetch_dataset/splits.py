"""The train/eval split, and the two parquet files it writes.

Row ``r`` of file ``f`` goes to eval when the blake2b-64 digest of ``"{seed}:{f}:{r}"``, read as a
big-endian integer and divided by 2**64, is below the eval fraction: stable across reruns, and
independent of the rows' contents, of the batching and of which other rows were bad. If that
sends no row to eval, the last train row is held back for it (``SplitWriter.close``).
``eval_mask`` computes it for an array of row indices: the digests with ``hashlib`` from a
hasher that has already taken the ``"{seed}:{f}:"`` prefix, the comparison in numpy (a uint64
converted to float64 rounds exactly as Python's ``int / 2**64`` does; a test checks both against
``to_eval``, the definition).

``SplitWriter`` takes each batch of normalised rows as one Arrow array and writes a row group
per ``ROW_GROUP_BYTES`` of decoded rows (or ``ROW_GROUP_ROWS`` rows) to each split's
``ParquetWriter``, on one worker thread (the parquet encoder releases the GIL, so it runs beside
the next batches' decoding and checks); at most one row group waits for it, so memory stays
bounded. The files go to temporary names that ``commit`` renames into place.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steps.fetch_dataset.buffers import arrow_integers

ROW_GROUP_BYTES = 8 << 20
ROW_GROUP_ROWS = 64 * 1024


def to_eval(seed: int, file_index: int, row_index: int, eval_fraction: float) -> bool:
    """The definition of the split for one row."""
    h = hashlib.blake2b(f"{seed}:{file_index}:{row_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < eval_fraction


def eval_mask(seed: int, file_index: int, rows: Any, eval_fraction: float) -> Any:
    """``to_eval`` for each row index of ``rows`` (a numpy integer array), as a numpy bool array."""
    import numpy as np

    if not len(rows) or not eval_fraction > 0:  # a digest / 2**64 is never below 0
        return np.zeros(len(rows), dtype=bool)
    copy = hashlib.blake2b(f"{seed}:{file_index}:".encode(), digest_size=8).copy
    digests: list[bytes] = []
    keep = digests.append
    for row in rows.tolist():  # the loop is the cost (~0.3 µs a row): no call per row but hashlib's
        h = copy()
        h.update(b"%d" % row)
        keep(h.digest())
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.float64) / 2.0**64 < eval_fraction


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class _Worker:
    """One thread running jobs in order, at most one waiting; its first error is raised in the
    caller at the next ``submit`` or at ``close`` (and later jobs are skipped)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fetch-dataset-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for the jobs; raise the first error."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise()


class SplitWriter:
    """Writes to temporary names in the output dir; ``commit`` renames them into place.

    ``add`` takes a batch of rows as an Arrow array of the output type, with their row indices
    (ascending) and decoded sizes. The last train row stays buffered until ``close``, which sends
    it to eval if eval would otherwise be empty.
    """

    def __init__(self, output_dir: Path, kind: str, eval_fraction: float, seed: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        column = "messages" if kind == "chat" else "text"
        self.schema = pa.schema([(column, pa.list_(message) if kind == "chat" else pa.string())])
        self.type = self.schema.field(0).type
        self.eval_fraction, self.seed = eval_fraction, seed
        self.paths = {"train": output_dir / "train.parquet", "eval": output_dir / "eval.parquet"}
        self.temporary = {s: temporary_path(p) for s, p in self.paths.items()}
        self._writers = {s: pq.ParquetWriter(p, self.schema) for s, p in self.temporary.items()}
        self._chunks: dict[str, list[Any]] = {"train": [], "eval": []}  # non-empty Arrow arrays, in row order
        self._buffered_rows = {"train": 0, "eval": 0}
        self._buffered_bytes = {"train": 0, "eval": 0}
        self.counts = {"train": 0, "eval": 0}
        self._worker = _Worker()

    def add(self, values: Any, rows: Any, sizes: Any, file_index: int, index: Any = None) -> None:
        """``values[i]`` is row ``rows[i]`` of file ``file_index``, ``sizes[i]`` its decoded bytes; with
        ``index`` (numpy integers, ascending), ``values[index[i]]`` is: the rows are picked from
        ``values`` by the same ``take`` that splits them, so they are copied once."""
        import numpy as np

        if not len(rows):
            return
        evaluation = eval_mask(self.seed, file_index, rows, self.eval_fraction)
        if index is None:
            if not evaluation.any():
                self._append("train", values, int(sizes.sum()))
                return
            index = np.arange(len(rows))
        if evaluation.any():
            self._append("eval", values.take(arrow_integers(index[evaluation])), int(sizes[evaluation].sum()))
        train = ~evaluation
        if train.any():
            self._append("train", values.take(arrow_integers(index[train])), int(sizes[train].sum()))

    def _append(self, split: str, values: Any, size: int) -> None:
        self._chunks[split].append(values)
        self._buffered_rows[split] += len(values)
        self._buffered_bytes[split] += size
        self.counts[split] += len(values)
        if self._buffered_rows[split] >= ROW_GROUP_ROWS or self._buffered_bytes[split] >= ROW_GROUP_BYTES:
            self._flush(split, keep_last=split == "train")

    def _flush(self, split: str, keep_last: bool = False) -> None:
        """Hand the buffered rows to the worker as one row group, less the last row if asked."""
        chunks = self._chunks[split]
        kept: list[Any] = []
        if keep_last and chunks:
            last = chunks.pop()
            kept = [last.slice(len(last) - 1, 1)]
            if len(last) > 1:
                chunks.append(last.slice(0, len(last) - 1))
        self._chunks[split] = kept
        self._buffered_rows[split] = len(kept)
        self._buffered_bytes[split] = 0
        if chunks:
            table = self._pa.Table.from_arrays([self._pa.chunked_array(chunks, type=self.type)], schema=self.schema)
            self._worker.submit(lambda writer=self._writers[split], table=table: writer.write_table(table))

    def close(self) -> None:
        # a non-empty eval set whenever there are 2+ rows and evaluation was asked for
        if self.eval_fraction > 0 and self.counts["eval"] == 0 and self.counts["train"] > 1:
            self._flush("train", keep_last=True)
            self._chunks["eval"], self._chunks["train"] = self._chunks["train"], []
            self.counts["train"] -= 1
            self.counts["eval"] += 1
        for split in ("train", "eval"):
            self._flush(split)
        self._worker.close()
        for writer in self._writers.values():
            writer.close()

    def discard(self) -> None:
        try:
            self._worker.close()
        except Exception:  # the write that failed is reported by whoever called close or add
            pass
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # closing a half-written file may fail again; it is removed either way
                pass
        for path in self.temporary.values():
            path.unlink(missing_ok=True)

    def commit(self) -> None:
        for split, path in self.paths.items():
            os.replace(self.temporary[split], path)
