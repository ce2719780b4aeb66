"""Step: fetch the tuning dataset, normalise it to chat messages, split off a held-out set.

``python -m steps.fetch_dataset --url URL [--url URL ...] --output-dir DIR [--config FILE]``

Each URL (http, https, file) is downloaded by ``steps.fetch_dataset.download`` (streamed, resumed,
capped, hashed, one retry policy). Its file type comes from the URL's extension, else Kaito's
``DatasetConfig.dataset_extension``, else the response's content type, else the first bytes.
``steps.fetch_dataset.readers`` then streams the rows in batches with the decoded bytes capped per row,
in total and per byte of file (``--max-row-bytes``, ``--max-decoded-bytes``, ``--max-expansion``),
so neither a large file nor a decompression bomb is ever held in memory. Batches already in the
output layout are checked and passed on as Arrow arrays (``steps.fetch_dataset.arrow``); other rows are
normalised one by one in Python. Rows are written the same way with two ``ParquetWriter``s, to temporary names that replace ``train.parquet``,
``eval.parquet`` and ``summary.json`` only when the whole dataset passed: a failed run leaves
whatever was in ``--output-dir`` as it was.

The format comes from each file's columns (``steps.fetch_dataset.formats``), or from Kaito's
``DatasetConfig`` columns when ``--config`` names a training config (``steps.fetch_dataset.kaito_dataset_config``).
The held-out split is decided per row by a seeded hash of (file, row index), so it is stable
across reruns and needs no second pass; if the hash happens to send no row to eval, the last
train row is held back for it (one row of look-ahead). Rows that fit their file's format badly
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
from collections.abc import Sequence
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
from steps.fetch_dataset.kaito_dataset_config import DatasetSettings, read_dataset_config
from steps.fetch_dataset.download import Fetched, fetch, safe_name
from steps.fetch_dataset.formats import (FORMAT_COLUMNS, FORMAT_KIND, BadRow, UnknownFormat, detect_format, estimate_tokens,
                                         normalise_row, shown_columns)
from steps.fetch_dataset.egress import EgressPolicy, Resolver, system_resolver
from steps.fetch_dataset.readers import BATCH_BYTES, BATCH_ROWS, DecodedBudget, Limits, Reader, byte_slices, file_type
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


# ---------------------------------------------------------------------------------------------
# Writing: train/eval parquet files of one schema, with one row of look-ahead for the eval split.


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class SplitWriter:
    """Writes to temporary names in the output dir; ``commit`` renames them into place.

    Rows come one at a time as Python values (``add``) or as runs of Arrow values already in the
    output type (``add_run``); each split keeps them in order and writes a row group per ~8 MiB.
    """

    def __init__(self, output_dir: Path, kind: str, eval_fraction: float, seed: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        column = "messages" if kind == "chat" else "text"
        self.schema = pa.schema([(column, pa.list_(message) if kind == "chat" else pa.string())])
        self.column = column
        self.eval_fraction, self.seed = eval_fraction, seed
        self.paths = {"train": output_dir / "train.parquet", "eval": output_dir / "eval.parquet"}
        self.temporary = {s: _temporary(p) for s, p in self.paths.items()}
        self._writers = {s: pq.ParquetWriter(p, self.schema) for s, p in self.temporary.items()}
        self._chunks: dict[str, list[Any]] = {"train": [], "eval": []}  # Arrow arrays, in row order
        self._pending: dict[str, list[Any]] = {"train": [], "eval": []}  # Python values after them
        self._buffered_rows = {"train": 0, "eval": 0}
        self._buffered_bytes = {"train": 0, "eval": 0}
        self.counts = {"train": 0, "eval": 0}
        # the latest train row (a Python value or a one-row array) and its size, written one row late
        self._held: tuple[Any, int] | None = None

    def _to_eval(self, file_index: int, row_index: int) -> bool:
        h = hashlib.blake2b(f"{self.seed}:{file_index}:{row_index}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < self.eval_fraction

    def add(self, value: Any, size: int, file_index: int, row_index: int) -> None:
        if self._to_eval(file_index, row_index):
            self._append("eval", value, size)
            return
        if self._held is not None:
            self._append("train", *self._held)
        self._held = (value, size)

    def add_run(self, values: Any, sizes: Any, file_index: int, first_row: int) -> None:
        """Consecutive good rows ``first_row, first_row + 1, ...`` as an Arrow array of the output type."""
        to_eval = [self._to_eval(file_index, first_row + i) for i in range(len(values))]
        train = [i for i, e in enumerate(to_eval) if not e]
        evaluation = [i for i, e in enumerate(to_eval) if e]
        if evaluation:
            self._append("eval", values.take(evaluation), int(sizes[evaluation].sum()))
        if train:
            if self._held is not None:
                self._append("train", *self._held)
            if len(train) > 1:
                self._append("train", values.take(train[:-1]), int(sizes[train[:-1]].sum()))
            self._held = (values.slice(train[-1], 1), int(sizes[train[-1]]))

    def _append(self, split: str, value: Any, size: int) -> None:
        if isinstance(value, self._pa.Array):
            self._seal(split)
            self._chunks[split].append(value)
            rows = len(value)
        else:
            self._pending[split].append(value)
            rows = 1
        self._buffered_rows[split] += rows
        self._buffered_bytes[split] += size
        self.counts[split] += rows
        if self._buffered_rows[split] >= BATCH_ROWS or self._buffered_bytes[split] >= BATCH_BYTES:
            self._flush(split)

    def _seal(self, split: str) -> None:
        if self._pending[split]:
            self._chunks[split].append(self._pa.array(self._pending[split], type=self.schema.field(0).type))
            self._pending[split] = []

    def _flush(self, split: str) -> None:
        self._seal(split)
        if self._chunks[split]:
            table = self._pa.table({self.column: self._pa.concat_arrays(self._chunks[split])}, schema=self.schema)
            self._writers[split].write_table(table)
            self._chunks[split] = []
            self._buffered_rows[split] = 0
            self._buffered_bytes[split] = 0

    def close(self) -> None:
        if self._held is not None:
            # a non-empty eval set whenever there are 2+ rows and evaluation was asked for
            split = "eval" if self.eval_fraction > 0 and self.counts["eval"] == 0 and self.counts["train"] > 0 else "train"
            self._append(split, *self._held)
            self._held = None
        for split, writer in self._writers.items():
            self._flush(split)
            writer.close()

    def discard(self) -> None:
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


def write_atomically(path: Path, text: str) -> None:
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------


def _arrow_batch(writer: SplitWriter, fmt: str, batch, sizes, file_index: int, first_row: int, python_row) -> int:
    """Write a batch's certainly-good rows as Arrow runs, the others through ``python_row``; the
    good runs' token estimate."""
    import numpy as np

    checked = canonical(fmt, batch.column(fmt))
    good = checked[0] if checked else np.zeros(batch.num_rows, dtype=bool)
    tokens = 0
    bounds = [0, *(np.flatnonzero(np.diff(good.astype(np.int8))) + 1).tolist(), batch.num_rows]
    for start, stop in zip(bounds, bounds[1:]):
        if start == stop:
            continue
        if good[start]:
            _, values, estimates = checked
            writer.add_run(values.slice(start, stop - start), 4 * estimates[start:stop], file_index, first_row + start)
            tokens += int(estimates[start:stop].sum())
            continue
        for offset, end in byte_slices(sizes[start:stop]):
            for i, row in enumerate(batch.slice(start + offset, end - offset).to_pylist()):
                python_row(row, first_row + start + offset + i)
    return tokens


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


def _open(item: Fetched, settings: DatasetSettings, budget: DecodedBudget) -> tuple[Reader, str, list[str]]:
    """The file's reader, its format and the columns to read."""
    where = f"url {redact_url(item.url)!r}"
    reader = Reader(item, file_type(item, settings.extension), budget)
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
    fetched: list[Fetched] = []
    for i, url in enumerate(config.url):
        item = fetch(url, downloads / safe_name(url, i), max_bytes=config.max_bytes, timeout_s=config.timeout,
                     retries=config.retries, policy=policy)
        log.info("fetched %s: %d bytes in %d attempt(s)", redact_url(url), item.size, item.attempts)
        fetched.append(item)
        report_progress(i + 1, 2 * len(config.url))

    budget = DecodedBudget(Limits(config.max_row_bytes, config.max_decoded_bytes, config.max_expansion))
    readers = [(item, *_open(item, settings, budget)) for item in fetched]
    kinds = {FORMAT_KIND[fmt] for _, _, fmt, _ in readers}
    if len(kinds) > 1:
        listing = ", ".join(f"{redact_url(item.url)} ({fmt})" for item, _, fmt, _ in readers)
        raise StepError(f"--url: files mix chat and plain-text formats, which cannot train together: {listing}")
    kind = kinds.pop()

    writer = SplitWriter(out, kind, eval_fraction, seed)
    files, bad_examples = [], []
    total_rows = total_bad = tokens = 0
    try:
        for file_index, (item, reader, fmt, columns) in enumerate(readers):
            shown = redact_url(item.url)
            rows = bad = 0

            def python_row(row: dict[str, Any], row_index: int) -> None:
                nonlocal bad, tokens
                try:
                    if "__bad__" in row:
                        raise BadRow(row["__bad__"])
                    if settings.mapping:
                        row = settings.mapping.apply(row)
                    value = normalise_row(fmt, row)
                except BadRow as exc:
                    bad += 1
                    if len(bad_examples) < MAX_REPORTED_BAD_ROWS:
                        bad_examples.append(f"{shown} row {row_index}: {exc}")
                    return
                estimate = estimate_tokens(value)
                tokens += estimate
                writer.add(value, 4 * estimate, file_index, row_index)

            if reader.arrow and settings.mapping is None and fmt in ("messages", "text"):
                for first_row, batch, sizes in reader.batches(columns):
                    rows += batch.num_rows
                    # python_row adds to tokens too: read it only after the batch is done
                    good_tokens = _arrow_batch(writer, fmt, batch, sizes, file_index, first_row, python_row)
                    tokens += good_tokens
            else:
                for row_index, row in reader.rows(columns):
                    rows += 1
                    python_row(row, row_index)
            files.append({"url": shown, "sha256": f"sha256:{item.sha256}", "bytes": item.size,
                          "decoded_bytes": reader.decoded, "format": fmt, "rows": rows, "bad_rows": bad})
            total_rows += rows
            total_bad += bad
            report_progress(len(config.url) + file_index + 1, 2 * len(config.url))
        writer.close()
    except BaseException:
        writer.discard()  # never leave a half dataset; what the output dir held stays as it was
        raise

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
        "format": readers[0][2] if len({fmt for _, _, fmt, _ in readers}) == 1 else "mixed",
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

