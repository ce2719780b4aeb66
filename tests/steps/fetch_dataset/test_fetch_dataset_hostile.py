"""A corpus of hostile dataset inputs: each exits 2 with the redacted URL and row index, leaves the
output directory and the source file as they were, and stays under 1 GB peak RSS.

Each case runs the real step in a child process (``run_step(main, argv)``, what ``python -m
steps.fetch_dataset`` runs) so its peak RSS (``VmHWM``) is its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.peak_rss import run_module_measured

RSS_LIMIT_KB = 1024 * 1024  # 1 GiB
SECRET = "s3cr3tSIGvalue"

def run_step_process(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, int]:
    """(exit code, stderr, the step's own peak RSS in KiB) of one fetch_dataset run."""
    code, stderr, peak = run_module_measured("steps.fetch_dataset", *args, "--outputs", str(tmp_path / "outputs"),
                                             env={**os.environ, **(env or {})})
    return code, stderr, peak // 1024


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An output dir holding a previous run's files, which a failed run must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous train")
    (out / "eval.parquet").write_bytes(b"previous eval")
    (out / "summary.json").write_text('{"previous": true}\n')
    return out


def assert_untouched(out: Path, source: Path | None = None, source_digest: str | None = None) -> None:
    assert (out / "train.parquet").read_bytes() == b"previous train"
    assert (out / "eval.parquet").read_bytes() == b"previous eval"
    assert (out / "summary.json").read_text() == '{"previous": true}\n'
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    if source is not None:
        assert hashlib.sha256(source.read_bytes()).hexdigest() == source_digest


def expect_rejected(tmp_path, out: Path, url: str, shown: str, match: str, *extra: str, source: Path | None = None):
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source and source.stat().st_size < 1 << 28 else None
    code, stderr, rss = run_step_process(tmp_path, "--url", url, "--output-dir", str(out), *extra)
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2, stderr
    assert len(error) == 1 and "Traceback" not in stderr, stderr
    assert f"url '{shown}'" in error[0], error[0]
    assert __import__("re").search(match, error[0]), error[0]
    assert rss < RSS_LIMIT_KB, f"peak RSS {rss / 1024:.0f} MiB"
    print(f"peak RSS {rss / 1024:.0f} MiB: {error[0]}")  # shown with pytest -s
    assert SECRET not in stderr
    assert_untouched(out, source if digest else None, digest)
    return error[0], rss


def signed(url: str) -> tuple[str, str]:
    """The URL with a SAS-like query, and how the step must show it."""
    return f"{url}?sv=2025-01-01&sig={SECRET}", f"{url}?sv=***&sig=***"


# --- decoded-size caps ---------------------------------------------------------------------


def test_parquet_dictionary_bomb_stops_at_the_expansion_cap(http_files, tmp_path, out_dir):
    # One 512-byte text repeated 2^20 times: ~60 KB of parquet, 512 MiB of rows.
    rows = 1 << 20
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["a" * 512]))
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": text}), path, compression="zstd")
    assert path.stat().st_size < 100_000
    url, shown = signed(http_files.add("bomb.parquet", path.read_bytes()))
    error, rss = expect_rejected(tmp_path, out_dir, url, shown, r"row \d+: \d+ decoded bytes from a \d+-byte file, "
                                 r"more than 100x expansion \(--max-expansion\)")
    row = int(error.split(" row ")[1].split(":")[0])
    assert 64 << 20 <= (row + 1) * 512 <= (64 << 20) + 512 * 1024  # stopped within a batch of the floor


def test_parquet_total_decoded_cap_names_the_row(tmp_path, out_dir):
    path = tmp_path / "many.parquet"
    rows = [f"{i:04d} " + "x" * 995 for i in range(5000)]  # 1000 bytes each
    pq.write_table(pa.table({"text": rows}), path)
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"row 1000: the data decodes to more than 1000000 bytes \(--max-decoded-bytes\)",
                    "--max-decoded-bytes", "1000000", source=path)


def test_parquet_row_over_the_row_cap_is_refused_before_decoding(tmp_path, out_dir):
    path = tmp_path / "huge-row.parquet"
    pq.write_table(pa.table({"text": ["short", "y" * (100 << 20), "short"]}), path, row_group_size=1,
                   compression="zstd", use_dictionary=False)
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"rows 1\.\.1: \d+ bytes uncompressed for 1 rows, so a row is over the per-row cap of 16777216",
                    source=path)


def test_parquet_nested_row_over_the_row_cap_names_it(tmp_path, out_dir):
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * 3000}]
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"messages": [turn, turn * 200, turn]}), path)
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"row 1: 603000 decoded bytes, over the per-row cap of 100000 \(--max-row-bytes\)",
                    "--max-row-bytes", "100000", source=path)


def test_jsonl_line_of_a_gigabyte_is_never_read_whole(tmp_path, out_dir):
    path = tmp_path / "long-line.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps({"text": "fine"}).encode() + b"\n")
        f.truncate(1 << 30)  # a sparse gigabyte with no newline: one endless second line
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"row 1: line longer than the per-row cap of 16777216 bytes \(--max-row-bytes\)")


def test_json_array_element_over_the_row_cap(http_files, tmp_path, out_dir):
    body = b'[{"text": "ok"}, {"text": "' + b"w" * (3 << 20) + b'"}]'
    url, shown = signed(http_files.add("long-element.json", body))
    expect_rejected(tmp_path, out_dir, url, shown, r"row 1: no complete JSON element within the per-row cap of 1048576",
                    "--max-row-bytes", str(1 << 20))


def test_csv_row_over_the_row_cap(tmp_path, out_dir):
    path = tmp_path / "long.csv"
    path.write_text("text\nshort\n" + "v" * (3 << 20) + "\nshort\n")
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"row \d+ or a later one is longer than the per-row cap of 1048576", "--max-row-bytes", str(1 << 20),
                    source=path)


def test_arrow_stream_row_over_the_row_cap(tmp_path, out_dir):
    path = tmp_path / "big.arrow"
    table = pa.table({"text": ["a", "b" * 200_000, "c"]})
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)
    expect_rejected(tmp_path, out_dir, path.as_uri(), path.as_uri(),
                    r"row 1: 200000 decoded bytes, over the per-row cap of 100000", "--max-row-bytes", "100000",
                    source=path)


# --- permanent errors are not retried ------------------------------------------------------


def test_redirect_to_a_file_url_is_bad_input(http_files, tmp_path, out_dir):
    url, shown = signed(http_files.url("anything.parquet", "redirect-to-file"))
    before = len(http_files.requests)
    error, _ = expect_rejected(tmp_path, out_dir, url, shown, r"redirected to a URL that is not http or https")
    assert len(http_files.requests) - before == 1, "a redirect out of http is not retried"


def test_redirect_loop_is_bad_input(http_files, tmp_path, out_dir):
    url, shown = signed(http_files.url("loop.parquet", "redirect-loop"))
    before = len(http_files.requests)
    expect_rejected(tmp_path, out_dir, url, shown, r"redirect loop or too many redirects \(TooManyRedirects")
    assert len(http_files.requests) - before <= 21, "the loop is followed once (20 redirects), not once per retry"


# --- the success path keeps secrets out of every output -------------------------------------


def test_signed_urls_never_reach_logs_summary_or_outputs(http_files, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)] + [{"prompt": "q", "completion": ""}]
    http_files.add("signed.parquet", _parquet(rows))
    base = http_files.url("signed.parquet", "redirect")
    host = base.split("//", 1)[1]
    url = f"http://user:{SECRET}-pw@{host}?se=2030&sig={SECRET}"
    code, stderr, _ = run_step_process(tmp_path, "--url", url, "--output-dir", str(tmp_path / "out"),
                                       "--max-bad-fraction", "0.1", env={"KAIFLOW_DEBUG": "1"})
    assert code == 0, stderr
    assert "HTTP Request: GET" in stderr, "httpx's own request log is on (and must be redacted)"
    summary = (tmp_path / "out" / "summary.json").read_text()
    outputs = "".join(p.read_text() for p in (tmp_path / "outputs").iterdir())
    for text in (stderr, summary, outputs):
        assert SECRET not in text
    shown = f"http://***@{host}?se=***&sig=***"
    assert json.loads(summary)["files"][0]["url"] == shown
    assert json.loads(summary)["bad_examples"] == [f"{shown} row 40: message 1 is an empty assistant turn"]
    assert shown in stderr
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_signed_url_in_an_http_error(http_files, tmp_path, out_dir):
    url, shown = signed(http_files.url("missing.parquet"))
    expect_rejected(tmp_path, out_dir, url, shown, r"HTTP 404")


def _parquet(rows: list[dict]) -> bytes:
    import io

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()
