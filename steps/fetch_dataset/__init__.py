"""Step: fetch the tuning dataset, normalise it to chat messages, split off a held-out set.

``python -m steps.fetch_dataset --url URL [--url URL ...] --output-dir DIR [--config FILE]``

Each URL (http, https, file) is downloaded by ``steps.fetch_dataset.download`` (streamed, resumed,
capped, hashed, one retry policy), one after another in URL order on a background thread
(``_Downloads``), while the main thread decodes each file as soon as it is complete: with several
URLs a file is decoded while the next one downloads, and a failure stops the downloads after it. A
URL declared parquet (by its extension or Kaito's ``dataset_extension``) is decoded row group by
row group while it downloads, when its server allows Range requests
(``steps.fetch_dataset.streaming``). Its
file type comes from the URL's extension, else Kaito's ``DatasetConfig.dataset_extension``, else the
response's content type, else the first bytes. ``steps.fetch_dataset.readers`` then streams the rows
in batches with the decoded bytes capped per row, in total and per byte of file
(``--max-row-bytes``, ``--max-decoded-bytes``, ``--max-expansion``), so neither a large file nor a
decompression bomb is ever held in memory; Arrow batches are decoded up to two ahead on a reader
thread (``readers.read_ahead``). Each batch is checked and normalised with Arrow compute where its
format and types allow (``messages``, ``prompt`` + ``completion``, ``text``:
``steps.fetch_dataset.arrow``); the rows it does not settle go through ``formats.normalise_row`` one
by one, and the batch goes on as one Arrow array, in row order. The splits are written by
``steps.fetch_dataset.splits``: a row group per ~8 MiB to each of two ``ParquetWriter``s on a worker
thread, to temporary names that replace ``train.parquet``, ``eval.parquet`` and ``summary.json``
only when the whole dataset passed: a failed run leaves whatever was in ``--output-dir`` as it was.

The format comes from each file's columns (``steps.fetch_dataset.formats``), or from Kaito's
``DatasetConfig`` columns when ``--config`` names a training config (``steps.fetch_dataset.kaito_dataset_config``).
The held-out split is decided per row by a seeded hash of (file, row index) (``splits.to_eval``,
computed a batch at a time), so it is stable across reruns and needs no second pass; if the hash
happens to send no row to eval, the last train row is held back for it. Rows that fit their file's format badly
are counted with their file and row index; more than ``--max-bad-fraction`` of them fails the
step here, before any GPU node is spent on training.

Outputs: ``dataset-digest`` (the sha256 of the one file fetched, or for several files the
sha256 of their ``sha256:<hex>`` lines in URL order) and ``summary`` (rows, token estimate,
format per file, digest), also written to ``DIR/summary.json``. URLs are redacted (query values
and userinfo masked) in the summary, the logs and every error line.

Exit codes: a download that still fails with 5xx/408/429 or a dropped connection after
``--retries`` exits 1 (``RetryableError``: the pipeline retries the step); another 4xx, a
redirect loop or to a non-http URL, an oversized or unreadable file, a row over a decoded cap,
bad rows, and any exception nobody classified exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepkit.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    report_progress,
    write_output,
)
from steps.fetch_dataset.arrow import canonical
from steps.fetch_dataset.buffers import arrow_integers
from steps.fetch_dataset.splits import SplitWriter, temporary_path
from steps.fetch_dataset.kaito_dataset_config import ColumnMapping, DatasetSettings, read_dataset_config
from steps.fetch_dataset.download import Fetched, fetch, safe_name
from steps.fetch_dataset.formats import (FORMAT_COLUMNS, FORMAT_KIND, BadRow, UnknownFormat, detect_format, estimate_tokens,
                                         normalise_row, shown_columns)
from steps.fetch_dataset.egress import EgressPolicy, Resolver, system_resolver
from steps.fetch_dataset.readers import (BATCH_BYTES, BATCH_ROWS, DecodedBudget, Limits, Reader, byte_slices,
                                         declared_type, file_type, read_ahead)
from steps.fetch_dataset.streaming import ParquetStream, StreamBroken
from stepkit.redaction import install_log_redaction, redact_text, redact_url

log = logging.getLogger("kaiflow.steps.fetch_dataset")

MAX_REPORTED_BAD_ROWS = 10
# Tests replace the resolver of --public-only (names mapped to addresses they choose, no DNS).
RESOLVER: Resolver | None = None


@dataclass
class FetchConfig:
    output_dir: Path = field(metadata={"help": "where train.parquet, eval.parquet and summary.json are written"})
    url: list[str] = field(default_factory=list, metadata={
        "help": "dataset URL (http, https or file); repeat for several files"})
    url_file: Path | None = field(default=None, metadata={
        "help": "a file of dataset URLs, one per line, read after --url (in a cluster: a mounted Secret, so that "
                "signed URLs stay out of the Workflow spec and the pod's arguments)"})
    config: Path | None = field(default=None, metadata={
        "help": "Kaito training_config.yaml (or its ConfigMap): DatasetConfig columns, split and seed apply"})
    max_bytes: int = field(default=2 * 1024**3, metadata={"help": "size cap per file in bytes (default %(default)s)"})
    max_row_bytes: int = field(default=16 * 1024**2, metadata={
        "help": "cap on one row's decoded bytes (default %(default)s)"})
    max_decoded_bytes: int = field(default=16 * 1024**3, metadata={
        "help": "cap on the decoded bytes of all files together (default %(default)s)"})
    max_expansion: float = field(default=100.0, metadata={
        "help": "cap on decoded bytes per byte of file, checked past 64 MiB decoded (default %(default)s)"})
    max_bad_fraction: float = field(default=0.05, metadata={
        "help": "fail when more than this share of rows fits no format (0..1) (default %(default)s)"})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of rows held out for evaluation (0..0.5); "
                               "DatasetConfig.train_test_split overrides it (default %(default)s)"}
    )
    seed: int = field(default=42, metadata={
        "help": "seed of the train/eval split; DatasetConfig.shuffle_seed overrides it (default %(default)s)"})
    timeout: float = field(
        default=30.0, metadata={"help": "seconds without progress before an HTTP attempt fails (default %(default)s)"}
    )
    retries: int = field(default=4, metadata={
        "help": "HTTP retries after the first attempt (dropped connection, 5xx) (default %(default)s)"})
    keep_downloads: bool = field(default=False, metadata={"help": "keep the raw downloaded files in DIR/downloads"})
    public_only: bool = field(default=False, metadata={
        "help": "in a cluster: connect only to public addresses (checked at every connection and redirect), refuse "
                "cluster DNS names, file: URLs and plain http (see steps/fetch_dataset/egress.py)"})
    allow_http: bool = field(default=False, metadata={"help": "with --public-only: allow plain http URLs"})
    allow_cidr: list[str] = field(default_factory=list, metadata={
        "help": "with --public-only: an address range allowed although not public (repeatable)", "metavar": "CIDR"})
    block_cidr: list[str] = field(default_factory=list, metadata={
        "help": "with --public-only: a further range refused, e.g. the cluster's service CIDR (repeatable)",
        "metavar": "CIDR"})
    cluster_domain: str = field(default="cluster.local", metadata={
        "help": "with --public-only: the cluster's DNS domain, whose names are refused (default %(default)s)"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.fetch_dataset", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, FetchConfig)
    add_common_arguments(parser)
    return parser


def write_atomically(path: Path, text: str) -> None:
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# One file's rows: normalised in batches, Arrow compute where it settles a row, Python otherwise.


class _FileRows:
    """Counts one file's rows, bad rows and tokens, and hands its good rows to the writer in
    batches, in row order."""

    def __init__(self, writer: SplitWriter, fmt: str, mapping: ColumnMapping | None, file_index: int, shown: str,
                 bad_examples: list[str]) -> None:
        self.writer, self.fmt, self.mapping, self.file_index = writer, fmt, mapping, file_index
        self.shown, self.bad_examples = shown, bad_examples
        self.rows = self.bad = self.tokens = 0

    def python(self, row: dict[str, Any], row_index: int) -> tuple[Any, int] | None:
        """A row through ``formats.normalise_row``: its value and token estimate, or None if bad."""
        try:
            if "__bad__" in row:
                raise BadRow(row["__bad__"])
            if self.mapping:
                row = self.mapping.apply(row)
            value = normalise_row(self.fmt, row)
        except BadRow as exc:
            self.bad += 1
            if len(self.bad_examples) < MAX_REPORTED_BAD_ROWS:
                self.bad_examples.append(f"{self.shown} row {row_index}: {exc}")
            return None
        return value, estimate_tokens(value)

    def batch(self, batch, first_row: int, sizes) -> None:
        """An Arrow batch (rows ``first_row, first_row + 1, ...``) with the decoded size of each row."""
        import numpy as np
        import pyarrow as pa

        n = batch.num_rows
        self.rows += n
        columns = batch if self.mapping is None else {c: batch.column(s) for c, s in self.mapping.columns.items()}
        checked = canonical(self.fmt, columns)
        if checked is not None:
            good, values, estimates = checked
            self.tokens += int(estimates[good].sum())
            if good.all():
                self.writer.add(values, np.arange(first_row, first_row + n), sizes, self.file_index)
                return
        else:
            good, values = np.zeros(n, dtype=bool), None
        # The rows Arrow did not settle, through Python in slices of about BATCH_BYTES decoded bytes.
        uncertain = np.flatnonzero(~good)
        positions, found = [], []
        for start, stop in byte_slices(sizes[uncertain]):
            picked = uncertain[start:stop]
            contiguous = int(picked[-1]) - int(picked[0]) + 1 == len(picked)
            part = batch.slice(int(picked[0]), len(picked)) if contiguous else batch.take(arrow_integers(picked))
            for position, row in zip(picked.tolist(), part.to_pylist()):
                result = self.python(row, first_row + position)
                if result is not None:
                    positions.append(position)
                    found.append(result[0])
                    self.tokens += result[1]
        if not found:  # the usual case: bad rows dropped by the same take that splits the batch
            picked = np.flatnonzero(good)
            self.writer.add(values, first_row + picked, sizes[picked], self.file_index, index=picked)
            return
        parts, kept = [], []
        if good.any():
            kept.append(np.flatnonzero(good))
            parts.append(values.take(arrow_integers(kept[-1])))
        if found:
            kept.append(np.array(positions, dtype=np.int64))
            parts.append(pa.array(found, type=self.writer.type))
        if not parts:
            return
        rows = np.concatenate(kept)
        merged = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:
            order = np.argsort(rows, kind="stable")
            rows, merged = rows[order], merged.take(arrow_integers(order))
        self.writer.add(merged, first_row + rows, sizes[rows], self.file_index)

    def python_rows(self, rows) -> None:
        """``(row index, dict)`` pairs of a reader that has no Arrow batches, in batches of up to
        BATCH_ROWS rows or BATCH_BYTES of normalised text."""
        import numpy as np
        import pyarrow as pa

        positions: list[int] = []
        found: list[Any] = []
        sizes: list[int] = []

        def flush() -> None:
            if found:
                self.writer.add(pa.array(found, type=self.writer.type), np.array(positions, dtype=np.int64),
                                np.array(sizes, dtype=np.int64), self.file_index)
                positions.clear(), found.clear(), sizes.clear()

        buffered = 0
        for row_index, row in rows:
            self.rows += 1
            result = self.python(row, row_index)
            if result is None:
                continue
            positions.append(row_index)
            found.append(result[0])
            sizes.append(4 * result[1])
            self.tokens += result[1]
            buffered += 4 * result[1]
            if len(found) >= BATCH_ROWS or buffered >= BATCH_BYTES:
                flush()
                buffered = 0
        flush()


def _check(config: FetchConfig) -> None:
    if not config.url:
        raise StepError("--url/--url-file: at least one dataset URL is needed")
    if not 0 <= config.max_bad_fraction <= 1:
        raise StepError(f"--max-bad-fraction must be in [0, 1], got {config.max_bad_fraction}")
    if not 0 <= config.eval_fraction <= 0.5:
        raise StepError(f"--eval-fraction must be in [0, 0.5], got {config.eval_fraction}")
    for flag, value in (("--max-bytes", config.max_bytes), ("--max-row-bytes", config.max_row_bytes),
                        ("--max-decoded-bytes", config.max_decoded_bytes), ("--max-expansion", config.max_expansion)):
        if value <= 0:
            raise StepError(f"{flag} must be positive, got {value}")


def _open(item: Fetched, settings: DatasetSettings, budget: DecodedBudget,
          stream: ParquetStream | None = None) -> tuple[Reader, str, list[str]]:
    """The file's reader, its format and the columns to read."""
    where = f"url {redact_url(item.url)!r}"
    reader = Reader(item, file_type(item, settings.extension), budget, stream)
    if not reader.columns:
        raise StepError(f"{where}: the file holds no rows")
    mapping = settings.mapping
    if mapping:
        for name, source in mapping.columns.items():
            if source not in reader.columns:
                raise StepError(f"{where}: DatasetConfig.{mapping.keys[name]} {source!r} is not a column of the "
                                f"file (columns: {', '.join(shown_columns(reader.columns))})")
        return reader, mapping.format, mapping.source_columns()
    try:
        fmt = detect_format(reader.columns)
    except UnknownFormat as exc:
        raise StepError(f"{where}: {exc}") from None
    return reader, fmt, [c for c in FORMAT_COLUMNS[fmt] if c in reader.columns]


def _read_rows(reader: Reader, columns: list[str], counted: _FileRows, stream: ParquetStream | None) -> None:
    """Every row of the file into ``counted``; Arrow batches decoded ahead on the reader thread,
    which stops waiting for a streamed file's bytes if this fails."""
    if not reader.arrow:
        counted.python_rows(reader.rows(columns))
        return
    batches = read_ahead(reader.batches(columns))
    try:
        for first_row, batch, sizes in batches:
            counted.batch(batch, first_row, sizes)
    except BaseException as exc:
        if stream is not None and not isinstance(exc, StreamBroken):
            stream.cancel()
        raise
    finally:
        batches.close()


class _Progress:
    """``done/total`` for Argo, counted from the download thread and the main thread alike."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.done += 1
            report_progress(self.done, self.total)


class _Downloads:
    """The step's URLs downloaded in order on one background thread, so that each file is decoded
    while the next one downloads. ``result(i)`` waits for file ``i`` (raising its download's error);
    a failed download stops the ones after it; ``close`` stops the one in flight at its next chunk
    (or its read timeout, when the server sends nothing) and waits for the thread.

    A URL declared parquet (``streamed``) gets a :class:`ParquetStream`: ``stream(i)`` waits until
    file ``i``'s footer is known (its row groups can then be read as they arrive) or its download
    ended without that (None: read the complete file from ``result(i)``)."""

    def __init__(self, config: FetchConfig, downloads: Path, policy: EgressPolicy | None, progress: _Progress,
                 streamed: Sequence[bool] = ()) -> None:
        self._stop = threading.Event()
        self._futures: list[Future[Fetched]] = [Future() for _ in config.url]
        self._streams = [ParquetStream() if i < len(streamed) and streamed[i] else None for i in range(len(config.url))]
        self._started: list[Future[ParquetStream | None]] = [Future() for _ in config.url]
        self._thread = threading.Thread(target=self._run, args=(config, downloads, policy, progress),
                                        name="fetch-downloads", daemon=True)
        self._thread.start()

    def _run(self, config: FetchConfig, downloads: Path, policy: EgressPolicy | None, progress: _Progress) -> None:
        try:
            for i, url in enumerate(config.url):
                future, stream = self._futures[i], self._streams[i]
                if self._stop.is_set() or not future.set_running_or_notify_cancel():
                    break
                started = self._started[i]
                if stream is not None:
                    stream.on_start = lambda started=started, stream=stream: started.set_result(stream)
                try:
                    item = fetch(url, downloads / safe_name(url, i), max_bytes=config.max_bytes,
                                 timeout_s=config.timeout, retries=config.retries, policy=policy, stop=self._stop,
                                 stream=stream)
                except BaseException as exc:  # handed to the main thread, which raises it when it gets there
                    future.set_exception(exc)  # (the stream, if any, is failed: its reader waits for this)
                    break
                finally:
                    if not started.done():  # the file was not streamed: the reader waits for result(i)
                        started.set_result(None)
                log.info("fetched %s: %d bytes in %d attempt(s)", redact_url(url), item.size, item.attempts)
                future.set_result(item)
                progress.add()
        finally:
            for future in self._futures:
                future.cancel()  # those never started (no-op for the others)
            for started in self._started:
                if not started.done():
                    started.set_result(None)

    def stream(self, index: int) -> ParquetStream | None:
        return self._started[index].result()

    def result(self, index: int) -> Fetched:
        return self._futures[index].result()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def fetch_dataset(config: FetchConfig) -> dict[str, Any]:
    if config.url_file is not None:
        try:
            listed = [line.strip() for line in Path(config.url_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise StepError(f"--url-file {config.url_file}: {exc.strerror}") from None
        config = dataclasses.replace(config, url=[*config.url, *listed], url_file=None)
    _check(config)
    downloads = Path(config.output_dir) / "downloads"
    try:
        return _fetch_dataset(config, downloads)
    finally:
        if not config.keep_downloads:
            shutil.rmtree(downloads, ignore_errors=True)


def _fetch_dataset(config: FetchConfig, downloads: Path) -> dict[str, Any]:
    settings = read_dataset_config(config.config) if config.config else DatasetSettings()
    for note in settings.notes:
        log.info("%s", note)
    eval_fraction = config.eval_fraction if settings.eval_fraction is None else settings.eval_fraction
    seed = config.seed if settings.seed is None else settings.seed
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    policy = None
    if config.public_only:
        policy = EgressPolicy(allow_http=config.allow_http, allow_cidr=tuple(config.allow_cidr),
                              block_cidr=tuple(config.block_cidr), cluster_domain=config.cluster_domain,
                              resolver=RESOLVER or system_resolver)
    budget = DecodedBudget(Limits(config.max_row_bytes, config.max_decoded_bytes, config.max_expansion))
    progress = _Progress(2 * len(config.url))
    streamed = [urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")
                and declared_type(url, settings.extension) == "parquet" for url in config.url]
    downloads_ahead = _Downloads(config, downloads, policy, progress, streamed)
    fetched: list[Fetched] = []
    opened: list[tuple[Fetched, str]] = []
    writer: SplitWriter | None = None
    files, bad_examples = [], []
    total_rows = total_bad = tokens = 0
    try:
        for file_index in range(len(config.url)):
            # the next file downloads while this one is decoded; a streamed parquet file is decoded
            # as it downloads, from its footer and the bytes on disk so far
            stream = downloads_ahead.stream(file_index)
            if stream is None:
                item = downloads_ahead.result(file_index)
            else:
                # its type is declared parquet (the condition for streaming), so no content type is needed
                item = Fetched(config.url[file_index], stream.path, "", stream.size, None)
            try:
                reader, fmt, columns = _open(item, settings, budget, stream)
                opened.append((item, fmt))
                if writer is None:
                    kind = FORMAT_KIND[fmt]
                    writer = SplitWriter(out, kind, eval_fraction, seed)
                elif FORMAT_KIND[fmt] != kind:
                    listing = ", ".join(f"{redact_url(done.url)} ({done_fmt})" for done, done_fmt in opened)
                    raise StepError(f"--url: files mix chat and plain-text formats, which cannot train together: {listing}")
                shown = redact_url(item.url)
                counted = _FileRows(writer, fmt, settings.mapping, file_index, shown, bad_examples)
                _read_rows(reader, columns, counted, stream)
            except StreamBroken:
                downloads_ahead.result(file_index)  # raises the download's own error
                raise
            finally:
                if stream is not None:
                    stream.close()
            if stream is not None:
                item = downloads_ahead.result(file_index)  # complete, its end checked against the footer
            fetched.append(item)
            rows, bad = counted.rows, counted.bad
            tokens += counted.tokens
            files.append({"url": shown, "sha256": f"sha256:{item.sha256}", "bytes": item.size,
                          "decoded_bytes": reader.decoded, "format": fmt, "rows": rows, "bad_rows": bad})
            total_rows += rows
            total_bad += bad
            progress.add()
        assert writer is not None  # at least one URL (_check)
        writer.close()
    except BaseException:
        if writer is not None:
            writer.discard()  # never leave a half dataset; what the output dir held stays as it was
        raise
    finally:
        downloads_ahead.close()  # after a failure: the file still downloading stops at its next chunk

    good = total_rows - total_bad
    for example in bad_examples:
        log.warning("bad row: %s", example)
    if good == 0 or total_bad / total_rows > config.max_bad_fraction:
        writer.discard()
    if good == 0:
        first = f"; first: {bad_examples[0]}" if bad_examples else ""
        raise StepError(f"--url: no usable rows ({total_rows} read, {total_bad} bad){first}")
    if total_bad / total_rows > config.max_bad_fraction:
        raise StepError(
            f"{total_bad} of {total_rows} rows are bad ({total_bad / total_rows:.1%} > --max-bad-fraction "
            f"{config.max_bad_fraction:.1%}); first: {bad_examples[0]}"
        )

    if len(fetched) == 1:
        digest = f"sha256:{fetched[0].sha256}"
    else:
        lines = "".join(f"sha256:{item.sha256}\n" for item in fetched)
        digest = "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    summary = {
        "digest": digest,
        "kind": kind,
        "format": opened[0][1] if len({fmt for _, fmt in opened}) == 1 else "mixed",
        "rows": good,
        "train_rows": writer.counts["train"],
        "eval_rows": writer.counts["eval"],
        "eval_fraction": eval_fraction,
        "bad_rows": total_bad,
        "bad_examples": bad_examples,
        "tokens_estimate": tokens,
        "decoded_bytes": budget.total,
        "files": files,
        "config_notes": settings.notes,
    }
    try:
        writer.commit()
        write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    finally:
        writer.discard()
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    install_log_redaction()
    args = build_parser().parse_args(argv)
    config = dataclass_from_args(FetchConfig, args)
    try:
        summary = fetch_dataset(config)
    except StepError as exc:  # the messages are built redacted; this is the last line of defence
        raise type(exc)(redact_text(str(exc))) from None
    except Exception as exc:
        # Not a failure anyone foresaw: a bug, or an input nobody classified. Retrying the step would
        # only repeat it, so exit 2; the (redacted) traceback goes to the debug log (KAIFLOW_DEBUG=1).
        log.debug("unexpected error", exc_info=True)
        raise StepError(f"unexpected {type(exc).__name__}: {redact_text(str(exc))}") from None
    brief = {k: v for k, v in summary.items() if k not in ("bad_examples", "files", "config_notes")}
    write_output(args.outputs, "dataset-digest", summary["digest"])
    write_output(args.outputs, "summary", brief)
    log.info(
        "dataset %s: %d rows (%d train, %d eval, %d bad), ~%d tokens, format %s",
        summary["digest"], summary["rows"], summary["train_rows"], summary["eval_rows"],
        summary["bad_rows"], summary["tokens_estimate"], summary["format"],
    )
    return 0

