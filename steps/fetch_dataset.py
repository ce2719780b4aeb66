"""Step: fetch the tuning dataset, normalise it to chat messages, split off a held-out set.

``python -m steps.fetch_dataset --url URL [--url URL ...] --output-dir DIR``

Each URL (http, https, file) is downloaded by ``steps.dataset_download`` (streamed, resumed,
capped, hashed). Its file type comes from the URL's extension, else the response's content type,
else the first bytes (``PAR1`` → parquet, ``[`` → JSON array, ``{`` → JSON lines). Rows are then
read in record batches — ``pyarrow.parquet.ParquetFile.iter_batches``, ``pyarrow.csv.open_csv``,
line by line for JSON lines, an incremental decoder for JSON arrays — so a large file is never
held in memory, and written the same way with two ``ParquetWriter``s: ``train.parquet`` and
``eval.parquet``.

The held-out split is decided per row by a seeded hash of (file, row index), so it is stable
across reruns and needs no second pass; if the hash happens to send no row to eval, the last
train row is held back for it (one row of look-ahead). Rows that fit their file's format badly
are counted with their file and row index; more than ``--max-bad-fraction`` of them fails the
step here, before any GPU node is spent on training.

Outputs: ``dataset-digest`` (the sha256 of the one file fetched, or for several files the
sha256 of their ``sha256:<hex>`` lines in URL order) and ``summary`` (rows, token estimate,
format per file, digest), also written to ``DIR/summary.json``.

Exit codes: a download that still fails with 5xx/408/429 or a dropped connection after
``--retries`` exits 1 (``RetryableError``: the pipeline retries the step); another 4xx, an
oversized or unreadable file and bad rows exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    report_progress,
    run_step,
    write_output,
)
from steps.dataset_download import Fetched, fetch, safe_name
from steps.dataset_formats import FORMAT_KIND, BadRow, UnknownFormat, detect_format, estimate_tokens, normalise_row

log = logging.getLogger("kaiflow.steps.fetch_dataset")

BATCH_ROWS = 1024
MAX_REPORTED_BAD_ROWS = 10
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
MEDIA_TYPES = {
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/parquet": "parquet",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/json": "json",
    "text/csv": "csv",
    "application/csv": "csv",
}


@dataclass
class FetchConfig:
    url: list[str] = field(metadata={"help": "dataset URL (http, https or file); repeat for several files"})
    output_dir: Path = field(metadata={"help": "where train.parquet, eval.parquet and summary.json are written"})
    max_bytes: int = field(default=2 * 1024**3, metadata={"help": "size cap per file in bytes (default %(default)s)"})
    max_bad_fraction: float = field(default=0.05, metadata={
        "help": "fail when more than this share of rows fits no format (0..1) (default %(default)s)"})
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of rows held out for evaluation (0..0.5) (default %(default)s)"}
    )
    seed: int = field(default=42, metadata={"help": "seed of the train/eval split (default %(default)s)"})
    timeout: float = field(
        default=30.0, metadata={"help": "seconds without progress before an HTTP attempt fails (default %(default)s)"}
    )
    retries: int = field(default=4, metadata={
        "help": "HTTP retries after the first attempt (dropped connection, 5xx) (default %(default)s)"})
    keep_downloads: bool = field(default=False, metadata={"help": "keep the raw downloaded files in DIR/downloads"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.fetch_dataset", description=__doc__.split("\n\n")[0])
    add_dataclass_arguments(parser, FetchConfig)
    add_common_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Reading: one iterator of (row index, row dict) per file, and the file's column names.


def file_type(fetched: Fetched) -> str:
    from urllib.parse import urlsplit

    suffix = Path(urlsplit(fetched.url).path).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if fetched.content_type in MEDIA_TYPES:
        return MEDIA_TYPES[fetched.content_type]
    with fetched.path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.lstrip()[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    raise StepError(
        f"url {fetched.url!r}: cannot tell the file type (extension {suffix or 'none'}, "
        f"content type {fetched.content_type or 'none'}); use .parquet, .jsonl, .json or .csv"
    )


class Reader:
    """Streams one file's rows; ``columns`` is known before the first row is read."""

    def __init__(self, fetched: Fetched, kind: str):
        self.fetched, self.kind = fetched, kind
        self.columns: list[str] = []
        self._rows: Iterator[dict[str, Any]] = self._open()

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return enumerate(self._rows)

    def _fail(self, what: str) -> StepError:
        return StepError(f"url {self.fetched.url!r}: {what}")

    def _open(self) -> Iterator[dict[str, Any]]:
        if self.kind == "parquet":
            return self._parquet()
        if self.kind == "csv":
            return self._csv()
        if self.kind == "jsonl":
            return self._jsonl()
        return self._json_array()

    def _parquet(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.fetched.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._fail(f"not a readable parquet file (truncated or corrupt?): {exc}") from None
        self.columns = parquet.schema_arrow.names

        def rows() -> Iterator[dict[str, Any]]:
            try:
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                    yield from batch.to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise self._fail(f"parquet data is corrupt: {exc}") from None

        return rows()

    def _csv(self) -> Iterator[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        try:
            reader = pcsv.open_csv(
                self.fetched.path,
                read_options=pcsv.ReadOptions(block_size=1 << 22),
                # every column is text: JSON-encoded messages and free text must not be type-guessed
                convert_options=pcsv.ConvertOptions(column_types={}, strings_can_be_null=False, auto_dict_encode=False),
            )
        except (pa.ArrowInvalid, OSError) as exc:
            raise self._fail(f"not a readable CSV file: {exc}") from None
        self.columns = reader.schema.names

        def rows() -> Iterator[dict[str, Any]]:
            try:
                for batch in reader:
                    yield from batch.to_pylist()
            except (pa.ArrowInvalid, OSError) as exc:
                raise self._fail(f"CSV data is malformed: {exc}") from None

        return rows()

    def _jsonl(self) -> Iterator[dict[str, Any]]:
        first = self._first_jsonl_record()
        self.columns = list(first) if first else []

        def rows() -> Iterator[dict[str, Any]]:
            with self.fetched.path.open("r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        record = {"__bad__": f"invalid JSON line ({exc.msg})"}
                    yield record if isinstance(record, dict) else {"__bad__": "line is not a JSON object"}

        return rows()

    def _first_jsonl_record(self) -> dict[str, Any] | None:
        with self.fetched.path.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise self._fail(f"first line is not valid JSON ({exc.msg}); expected JSON lines") from None
                    if not isinstance(record, dict):
                        raise self._fail("first line is not a JSON object; expected one object per line")
                    return record
        return None

    def _json_array(self) -> Iterator[dict[str, Any]]:
        records = _iter_json_array(self.fetched.path, self._fail)
        try:
            first = next(records)
        except StopIteration:
            self.columns = []
            return iter(())
        if not isinstance(first, dict):
            raise self._fail("the JSON array holds no objects; expected a list of records")
        self.columns = list(first)

        def rows() -> Iterator[dict[str, Any]]:
            yield first
            for record in records:
                yield record if isinstance(record, dict) else {"__bad__": "array element is not a JSON object"}

        return rows()


def _iter_json_array(path: Path, fail) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded one at a time from 1 MiB reads."""
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8", errors="replace") as f:
        buf = f.read(1 << 20).lstrip()
        if not buf.startswith("["):
            raise fail("a .json file must hold a JSON array of records (or use .jsonl for JSON lines)")
        buf, pos, eof = buf[1:], 0, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if eof:
                    raise fail(f"invalid or truncated JSON array ({exc.msg})") from None
                more = f.read(1 << 20)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if end == len(buf) and not eof:  # a number may continue in the next read
                more = f.read(1 << 20)
                eof = not more
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
            yield value
            buf, pos = buf[end:], 0


# ---------------------------------------------------------------------------------------------
# Writing: train/eval parquet files of one schema, with one row of look-ahead for the eval split.


class SplitWriter:
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
        self._writers = {s: pq.ParquetWriter(p, self.schema) for s, p in self.paths.items()}
        self._buffers: dict[str, list[Any]] = {"train": [], "eval": []}
        self.counts = {"train": 0, "eval": 0}
        self._held: Any = None  # the latest train row, written one row late

    def _to_eval(self, file_index: int, row_index: int) -> bool:
        h = hashlib.blake2b(f"{self.seed}:{file_index}:{row_index}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < self.eval_fraction

    def add(self, value: Any, file_index: int, row_index: int) -> None:
        if self._to_eval(file_index, row_index):
            self._append("eval", value)
            return
        if self._held is not None:
            self._append("train", self._held)
        self._held = value

    def _append(self, split: str, value: Any) -> None:
        self._buffers[split].append(value)
        self.counts[split] += 1
        if len(self._buffers[split]) >= BATCH_ROWS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if self._buffers[split]:
            table = self._pa.table({self.column: self._buffers[split]}, schema=self.schema)
            self._writers[split].write_table(table)
            self._buffers[split] = []

    def close(self) -> None:
        if self._held is not None:
            # a non-empty eval set whenever there are 2+ rows and evaluation was asked for
            split = "eval" if self.eval_fraction > 0 and self.counts["eval"] == 0 and self.counts["train"] > 0 else "train"
            self._append(split, self._held)
            self._held = None
        for split, writer in self._writers.items():
            self._flush(split)
            writer.close()


# ---------------------------------------------------------------------------------------------


def fetch_dataset(config: FetchConfig) -> dict[str, Any]:
    if not config.url:
        raise StepError("--url: at least one dataset URL is needed")
    if not 0 <= config.max_bad_fraction <= 1:
        raise StepError(f"--max-bad-fraction must be in [0, 1], got {config.max_bad_fraction}")
    if not 0 <= config.eval_fraction <= 0.5:
        raise StepError(f"--eval-fraction must be in [0, 0.5], got {config.eval_fraction}")
    if config.max_bytes <= 0:
        raise StepError(f"--max-bytes must be positive, got {config.max_bytes}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    downloads = out / "downloads"

    fetched: list[Fetched] = []
    for i, url in enumerate(config.url):
        item = fetch(url, downloads / safe_name(url, i), max_bytes=config.max_bytes, timeout_s=config.timeout, retries=config.retries)
        log.info("fetched %s: %d bytes, sha256:%s", url, item.size, item.sha256)
        fetched.append(item)
        report_progress(i + 1, 2 * len(config.url))

    readers = []
    for item in fetched:
        reader = Reader(item, file_type(item))
        try:
            fmt = detect_format(reader.columns) if reader.columns else None
        except UnknownFormat as exc:
            raise StepError(f"url {item.url!r}: {exc}") from None
        if fmt is None:
            raise StepError(f"url {item.url!r}: the file holds no rows")
        readers.append((item, reader, fmt))
    kinds = {FORMAT_KIND[fmt] for _, _, fmt in readers}
    if len(kinds) > 1:
        listing = ", ".join(f"{item.url} ({fmt})" for item, _, fmt in readers)
        raise StepError(f"--url: files mix chat and plain-text formats, which cannot train together: {listing}")
    kind = kinds.pop()

    writer = SplitWriter(out, kind, config.eval_fraction, config.seed)
    files, bad_examples = [], []
    total_rows = total_bad = tokens = 0
    try:
        for file_index, (item, reader, fmt) in enumerate(readers):
            rows = bad = 0
            for row_index, row in reader:
                rows += 1
                try:
                    if "__bad__" in row:
                        raise BadRow(row["__bad__"])
                    value = normalise_row(fmt, row)
                except BadRow as exc:
                    bad += 1
                    if len(bad_examples) < MAX_REPORTED_BAD_ROWS:
                        bad_examples.append(f"{item.url} row {row_index}: {exc}")
                    continue
                tokens += estimate_tokens(value)
                writer.add(value, file_index, row_index)
            files.append({"url": item.url, "sha256": f"sha256:{item.sha256}", "bytes": item.size, "format": fmt, "rows": rows, "bad_rows": bad})
            total_rows += rows
            total_bad += bad
            report_progress(len(config.url) + file_index + 1, 2 * len(config.url))
    except BaseException:
        writer.close()
        for path in writer.paths.values():
            path.unlink(missing_ok=True)  # never leave a half dataset for tune to pick up
        raise
    writer.close()

    good = total_rows - total_bad
    for example in bad_examples:
        log.warning("bad row: %s", example)
    if good == 0 or total_bad / total_rows > config.max_bad_fraction:
        for path in writer.paths.values():
            path.unlink(missing_ok=True)
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
        "format": readers[0][2] if len({fmt for _, _, fmt in readers}) == 1 else "mixed",
        "rows": good,
        "train_rows": writer.counts["train"],
        "eval_rows": writer.counts["eval"],
        "bad_rows": total_bad,
        "bad_examples": bad_examples,
        "tokens_estimate": tokens,
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not config.keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = dataclass_from_args(FetchConfig, args)
    summary = fetch_dataset(config)
    brief = {k: v for k, v in summary.items() if k not in ("bad_examples", "files")}
    write_output(args.outputs, "dataset-digest", summary["digest"])
    write_output(args.outputs, "summary", brief)
    log.info(
        "dataset %s: %d rows (%d train, %d eval, %d bad), ~%d tokens, format %s",
        summary["digest"], summary["rows"], summary["train_rows"], summary["eval_rows"],
        summary["bad_rows"], summary["tokens_estimate"], summary["format"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
