"""A parquet file's row groups decoded while the rest of it downloads (steps.fetch_dataset.streaming),
against the real local HTTP server of ``http_files``: the overlap itself, the same output as
without it, the footer read in one or two requests, and every way it can go wrong."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import steps.fetch_dataset as fd
from stepkit.common import RetryableError, StepError
from steps.fetch_dataset import FetchConfig, fetch_dataset, streaming

ROWS = [{"messages": [{"role": "user", "content": f"question {i}: " + "word " * (i % 17)},
                      {"role": "assistant", "content": f"answer {i}."}]} for i in range(400)]


def grouped_parquet(rows: list[dict], group: int = 50) -> bytes:
    """The rows in row groups of ``group`` rows (8 for ROWS)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=group)
    return buf.getvalue()


def run(out, *urls, **options) -> dict:
    return fetch_dataset(FetchConfig(url=list(urls), output_dir=out, retries=options.pop("retries", 2), **options))


def splits(out) -> tuple[list[dict], list[dict]]:
    return pq.read_table(out / "train.parquet").to_pylist(), pq.read_table(out / "eval.parquet").to_pylist()


def wait_for(condition, what: str, bound_s: float = 60.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


@pytest.fixture
def streamed(monkeypatch):
    """Stream files of any size (the step's floor is 16 MiB), the footer from a 4 KiB tail."""
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(streaming, "TAIL_BYTES", 4096)


def in_thread(target):
    outcome: dict = {}

    def body() -> None:
        try:
            outcome["summary"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=body)
    worker.start()
    return worker, outcome


def test_row_groups_are_decoded_while_the_rest_of_the_file_downloads(http_files, tmp_path, streamed, monkeypatch):
    """The server sends half the file, then holds the rest: rows of the first half reach the
    split writer meanwhile. The output is the one the step writes from the complete file."""
    data = grouped_parquet(ROWS)
    assert len(data) > 4096 * 2
    http_files.add("stream-held.parquet", data)
    decoded: list[int] = []
    batch = fd._FileRows.batch
    monkeypatch.setattr(fd._FileRows, "batch", lambda self, b, first, sizes: (decoded.append(b.num_rows),
                                                                             batch(self, b, first, sizes)))
    worker, outcome = in_thread(lambda: run(tmp_path / "streamed", http_files.url("stream-held.parquet", "held-ranges")))
    try:
        # held until released below: rows are decoded now only if the step reads the file as it arrives
        wait_for(lambda: http_files.holding("stream-held.parquet") and sum(decoded) >= 50,
                 "a row group decoded while the rest of the file is held")
        assert worker.is_alive()
    finally:
        http_files.release("stream-held.parquet")
        worker.join(120)
    assert "error" not in outcome, outcome
    ranges = [r for _, r in http_files.requests_for("stream-held.parquet") if r]
    assert ranges == ["bytes=-4096"]  # the footer; the body in one GET

    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", 1 << 40)  # the same file, read once complete
    whole = run(tmp_path / "whole", http_files.add("stream-whole.parquet", data))
    streamed_summary = outcome["summary"]
    assert streamed_summary["digest"] == whole["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    for key in ("rows", "train_rows", "eval_rows", "bad_rows", "tokens_estimate", "decoded_bytes"):
        assert streamed_summary[key] == whole[key], key
    assert splits(tmp_path / "streamed") == splits(tmp_path / "whole")
    assert sum(decoded) == 2 * len(ROWS)


def test_a_footer_larger_than_the_first_tail_is_asked_for_at_its_size(http_files, tmp_path, streamed, monkeypatch,
                                                                        caplog):
    monkeypatch.setattr(streaming, "TAIL_BYTES", 64)
    data = grouped_parquet(ROWS)
    footer = streaming.footer_length(data[-64:])
    assert footer is not None and footer > 64
    caplog.set_level(logging.DEBUG, logger="kaiflow.steps.fetch_dataset")
    summary = run(tmp_path / "out", http_files.add("big-footer.parquet", data))
    assert summary["rows"] == len(ROWS)
    ranges = [r for _, r in http_files.requests_for("big-footer.parquet") if r]
    assert ranges == ["bytes=-64", f"bytes=-{footer}"]
    assert "decoding 8 row groups as they arrive" in caplog.text


def test_a_file_that_changed_between_its_footer_and_its_body_fails_retryable(http_files, tmp_path, streamed):
    """The footer request gets a different end of file than the body: the rows read may not be
    the file's, so the step fails (exit 1, the pipeline retries it) and the output stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"the previous dataset")
    http_files.add("changing.parquet", grouped_parquet(ROWS))
    with pytest.raises(RetryableError, match="changing.parquet.*changed on the server during the download"):
        run(out, http_files.url("changing.parquet", "changing"))
    assert (out / "train.parquet").read_bytes() == b"the previous dataset"
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]


def test_a_resume_answered_with_the_whole_file_fails_retryable(http_files, tmp_path, streamed):
    """The connection drops half way after row groups were read; the resume gets a 200 (the
    server's file is not the one it was): the rows read cannot be trusted, so the step fails (exit
    1) rather than mixing two versions."""
    http_files.add("restarts.parquet", grouped_parquet(ROWS))
    with pytest.raises(RetryableError, match="restarts.parquet.*changed on the server during the download"):
        run(tmp_path / "out", http_files.url("restarts.parquet", "drop-then-whole"))
    ranges = [r for _, r in http_files.requests_for("restarts.parquet") if r]
    assert ranges[0] == "bytes=-4096" and ranges[1].startswith("bytes=") and ranges[1].endswith("-")


@pytest.mark.parametrize("mode", ["drop-once", "drop-at-start"])
def test_a_dropped_connection_is_retried_into_the_same_stream(http_files, tmp_path, streamed, caplog, mode):
    """``drop-once``: half the body, then the connection drops: the retry resumes with Range.
    ``drop-at-start``: the headers start the stream, then the connection closes before any byte;
    the retry's 200 fills the same file the reader is linked to. Either way the rows come through
    streamed."""
    caplog.set_level(logging.DEBUG, logger="kaiflow.steps.fetch_dataset")
    data = grouped_parquet(ROWS)
    name = f"stream-{mode}.parquet"
    http_files.add(name, data)
    summary = run(tmp_path / "out", http_files.url(name, mode))
    assert summary["rows"] == len(ROWS) and summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert caplog.text.count("row groups as they arrive") == 1
    retried = f"bytes={len(data) // 2}-" if mode == "drop-once" else None  # resumed, or from zero
    assert [r for _, r in http_files.requests_for(name)] == [None, "bytes=-4096", retried]


def test_a_download_that_fails_mid_file_reports_its_own_error(http_files, tmp_path, streamed):
    """The rest of the file never comes: the reader waiting for it wakes, and the step reports the
    download's timeout, not corrupt parquet."""
    http_files.add("stream-stalls.parquet", grouped_parquet(ROWS))
    worker, outcome = in_thread(lambda: run(tmp_path / "out", http_files.url("stream-stalls.parquet", "held-ranges"),
                                            timeout=1.0, retries=0))
    try:
        worker.join(60)
        assert not worker.is_alive(), "the step hung on a file whose download failed"
    finally:
        http_files.release("stream-stalls.parquet")
        worker.join(60)
    error = outcome.get("error")
    assert isinstance(error, RetryableError), outcome
    assert "stream-stalls.parquet" in str(error) and "ReadTimeout" in str(error) and "corrupt" not in str(error)


def test_a_bad_row_group_stops_the_download_still_in_flight(http_files, tmp_path, streamed):
    """A row over --max-row-bytes in the half already downloaded fails the step at once, while
    the server still holds the rest; the download in flight is stopped, nothing is written."""
    rows = [dict(r) for r in ROWS]
    rows[3] = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}
    http_files.add("stream-cap.parquet", grouped_parquet(rows))
    # timeout: the download thread, blocked on a server that sends nothing, sees the stop at its read timeout
    worker, outcome = in_thread(lambda: run(tmp_path / "out", http_files.url("stream-cap.parquet", "held-ranges"),
                                            max_row_bytes=4096, timeout=2.0))
    try:
        wait_for(lambda: "error" in outcome, "the step failing on the row over the cap")
        assert http_files.holding("stream-cap.parquet"), "the failure came before the rest of the file"
    finally:
        http_files.release("stream-cap.parquet")
        worker.join(60)
    assert isinstance(outcome["error"], StepError) and "row 3" in str(outcome["error"]), outcome
    assert "--max-row-bytes" in str(outcome["error"])
    assert not (tmp_path / "out" / "train.parquet").exists()


@pytest.mark.parametrize("mode,suffix_sent", [("held", False), ("files", True)])
def test_without_a_usable_footer_request_the_file_is_read_once_complete(http_files, tmp_path, streamed, monkeypatch,
                                                                       mode, suffix_sent):
    """``held``: no Range support (no Accept-Ranges, no ETag), so no footer request at all; ``files``
    with a tail as large as the file: the suffix request is answered 200 (the whole file), closed
    unread. Either way the rows come from the complete file."""
    data = grouped_parquet(ROWS)
    if mode == "files":
        monkeypatch.setattr(streaming, "TAIL_BYTES", 1 << 30)
    name = f"no-stream-{mode}.parquet"
    http_files.add(name, data)
    http_files.release(name)  # ``held``: the body is sent whole
    summary = run(tmp_path / "out", http_files.url(name, mode))
    assert summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest() and summary["rows"] == len(ROWS)
    ranges = [r for _, r in http_files.requests_for(name) if r]
    assert ranges == ([f"bytes=-{len(data)}"] if suffix_sent else [])


def test_several_streamed_files_each_get_their_own_digest(http_files, tmp_path, streamed, caplog):
    """Each file is hashed behind its own download (one hashing thread, in URL order), and the
    step's digest is the one of their digests, as without streaming."""
    caplog.set_level(logging.DEBUG, logger="kaiflow.steps.fetch_dataset")
    datas = [grouped_parquet(ROWS[i::3]) for i in range(3)]
    urls = [http_files.add(f"several-{i}.parquet", data) for i, data in enumerate(datas)]
    summary = run(tmp_path / "out", *urls, keep_downloads=True)
    digests = [hashlib.sha256(data).hexdigest() for data in datas]
    assert [f["sha256"] for f in summary["files"]] == [f"sha256:{d}" for d in digests]
    lines = "".join(f"sha256:{d}\n" for d in digests)
    assert summary["digest"] == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert summary["rows"] == len(ROWS)
    assert caplog.text.count("row groups as they arrive") == 3
    kept = sorted(p.name for p in (tmp_path / "out" / "downloads").iterdir())
    assert kept == [f"{i:03d}-several-{i}.parquet" for i in range(3)]  # the links the readers used are gone
    assert [(tmp_path / "out" / "downloads" / name).read_bytes() for name in kept] == datas
