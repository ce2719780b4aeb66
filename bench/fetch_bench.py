"""The fetch step on a large parquet over local HTTP: peak RSS, and throughput against a plain download.

Generates a parquet of chat rows (``messages``: a user and an assistant turn of random words, about
1 KiB a row, row groups of 64 Ki rows) of about ``--size-mb`` MB, serves it from a separate
``http.server`` process on 127.0.0.1, and per round runs, each in a fresh child process:

* plain download: httpx streaming GET into a file, chunks as received, nothing else (the ceiling);
* fetch step: ``steps.fetch_dataset.fetch_dataset`` (download with sha256, decoded-size caps,
  normalisation, train/eval parquet written); its download phase is timed on its own too. The
  server honours ``Range`` (and sends an ETag), so the step decodes each file's row groups while
  the rest of it downloads (``steps.fetch_dataset.streaming``);
* the same step against the same server under ``/no-range/``, which ignores ``Range`` as
  ``http.server`` does: each file is decoded once complete (the two variants alternate in order).

With ``--files N`` the same rows are served as N parquet files (whole row groups each), the plain
download fetches them one after another and the step gets N URLs: the step decodes each file while
the next one downloads, so the whole step can take less than its download phase plus decoding.
With ``--rate-mb-s R`` the server sends at most R MB/s per connection (a network-bound download,
as from a remote store, rather than loopback's CPU-bound one).

Prints sizes, then the median of ``--rounds`` (default 3) of: seconds, MB/s of the file's bytes,
the ratio to the plain download of each variant's whole step and download phase, each child's peak
RSS (``VmHWM``), and how much faster the streamed variant is than the one without Range. Aims
(issue 21): peak RSS < 300 MB, whole step >= 0.5x plain, and the download phase alone (the variant
without Range, where nothing else runs during it) >= 0.8x plain. Each round's line carries its own
whole-step ratios; the summary's ratios are of medians.

Also times the two JSON readers on the same rows (``--json-mb`` MB as a JSON array and as JSON
lines): the JSON-array reader is linear, so its seconds per MiB stay close to the JSON-lines
reader's. The old reader copied its 1 MiB buffer per element: 0.3 s/MiB against 0.02 on short
rows, 0.060 s/MiB on this bench's 1.2 KB rows (the new one: 0.012).

    python bench/fetch_bench.py [--size-mb 1024] [--rounds 3] [--files 1] [--rate-mb-s R] [--json-mb 64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROW_GROUP = 64 * 1024

PLAIN = """
import json, re, sys, time
from pathlib import Path
import httpx
target, urls = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
with httpx.Client(timeout=60) as client:
    for i, url in enumerate(urls):  # one after another, as the step downloads them
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
            r.raise_for_status()
            with open(f"{target}.{i}", "wb") as out:
                for chunk in r.iter_raw():  # as received, like the step (re-chunking to 1 MiB costs copies)
                    out.write(chunk)
seconds = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"seconds": seconds, "download_seconds": seconds, "peak_kb": peak}))
"""

# http.server's file handler, sending at most RATE MB/s per connection (0: as fast as it can), with
# Range requests (``bytes=N-`` and the suffix ``bytes=-N``, ``If-Range``), an ETag and
# Accept-Ranges; under /no-range/ the same files without them (http.server's own behaviour).
SERVER = """
import functools, os, shutil, sys, time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
port, directory, rate = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) * 1e6
class Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        ranges = not self.path.startswith("/no-range/")
        name = self.path.removeprefix("/no-range/").lstrip("/")
        try:
            f = open(os.path.join(directory, name), "rb")
        except OSError:
            return self.send_error(404)
        with f:
            stat = os.fstat(f.fileno())
            size, etag = stat.st_size, f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
            start, code = 0, 200
            spec = self.headers.get("Range", "")
            if ranges and spec.startswith("bytes=") and self.headers.get("If-Range", etag) == etag:
                first, _, last = spec[len("bytes="):].partition("-")
                if not first and last.isdigit():
                    start, code = max(size - int(last), 0), 206
                elif first.isdigit() and not last and int(first) < size:
                    start, code = int(first), 206
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if ranges:
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            f.seek(start)
            self.copyfile(f, self.wfile)
    def copyfile(self, source, outputfile):
        if not rate:
            return shutil.copyfileobj(source, outputfile)
        start, sent = time.perf_counter(), 0
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            sent += len(chunk)
            ahead = sent / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=directory)).serve_forever()
"""

STEP = """
import json, logging, re, sys, time
from pathlib import Path
import steps.fetch_dataset as fd
out, urls = sys.argv[1], sys.argv[2:]
timings = {}
spans = []
download = fd.fetch
def timed_fetch(*args, **kwargs):
    began = time.perf_counter()
    try:
        return download(*args, **kwargs)
    finally:
        spans.append((began, time.perf_counter()))
fd.fetch = timed_fetch
logging.basicConfig(level=logging.WARNING)
start = time.perf_counter()
summary = fd.fetch_dataset(fd.FetchConfig(url=urls, output_dir=Path(out)))
timings["download_seconds"] = max(end for _, end in spans) - min(began for began, _ in spans)
timings["seconds"] = time.perf_counter() - start
timings["peak_kb"] = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
timings["rows"] = summary["rows"]
timings["decoded_bytes"] = summary["decoded_bytes"]
print(json.dumps(timings))
"""


def make_parquet(path: Path, size_mb: float, seed: int = 0) -> int:
    """Rows of random words until the file holds about size_mb MB; returns the row count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20000)])
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("messages", pa.list_(message))])
    rows = 0
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while not path.exists() or path.stat().st_size < size_mb * 1e6:
            words = rng.choice(vocab, size=ROW_GROUP * 180)
            blob = " ".join(words.tolist())
            cuts = np.sort(rng.integers(0, len(blob), size=ROW_GROUP * 2 - 1))
            pieces = np.split(np.frombuffer(blob.encode(), dtype=np.uint8), cuts)
            texts = [p.tobytes().decode() or "x" for p in pieces]
            users, answers = texts[0::2], texts[1::2]
            column = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in zip(users, answers)]
            writer.write_table(pa.table({"messages": pa.array(column, type=schema.field(0).type)}, schema=schema))
            rows += ROW_GROUP
    return rows


def shards(data: Path, files: int) -> list[str]:
    """``data`` itself for one file, else ``files`` parquet files beside it holding its row groups in order."""
    import pyarrow.parquet as pq

    if files <= 1:
        return [data.name]
    source = pq.ParquetFile(data)
    groups = source.metadata.num_row_groups
    if files > groups:
        raise SystemExit(f"--files {files}: the parquet has only {groups} row groups")
    names = [f"part-{i:02d}-of-{files:02d}.parquet" for i in range(files)]
    if all((data.parent / name).exists() and (data.parent / name).stat().st_mtime >= data.stat().st_mtime
           for name in names):
        return names
    for i, name in enumerate(names):
        with pq.ParquetWriter(data.parent / name, source.schema_arrow, compression="snappy") as writer:
            for group in range(i * groups // files, (i + 1) * groups // files):
                writer.write_table(source.read_row_group(group))
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def json_readers(work: Path, parquet: Path, json_mb: float) -> tuple[float, float]:
    """Seconds per MiB of the JSON-array and the JSON-lines reader on the same records."""
    import pyarrow.parquet as pq

    from steps.fetch_dataset.download import Fetched
    from steps.fetch_dataset.readers import DecodedBudget, Limits, Reader

    array, lines = work / "rows.json", work / "rows.jsonl"
    with array.open("w") as fa, lines.open("w") as fl:
        fa.write("[")
        first = True
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                text = json.dumps(row)
                fa.write(("" if first else ",\n") + text)
                fl.write(text + "\n")
                first = False
            if lines.stat().st_size > json_mb * 1e6:
                break
        fa.write("]\n")
    results = []
    for path, kind in ((array, "json"), (lines, "jsonl")):
        size = path.stat().st_size
        fetched = Fetched(path.as_uri(), path, "", size, None)
        limits = Limits(16 << 20, 1 << 40, 1e9)
        start = time.perf_counter()
        count = sum(1 for _ in Reader(fetched, kind, DecodedBudget(limits)).rows())
        seconds = time.perf_counter() - start
        results.append(seconds / (size / 2**20))
        print(f"  {kind:5s} reader: {size / 2**20:7.1f} MiB, {count} rows, {seconds:6.2f} s, {results[-1]:.4f} s/MiB")
    return results[0], results[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="parquet size in MB (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are printed (default %(default)s)")
    parser.add_argument("--files", type=int, default=1, help="serve the rows as this many parquet files (default %(default)s)")
    parser.add_argument("--rate-mb-s", type=float, default=0,
                        help="the server's send rate per connection in MB/s (default: unlimited)")
    parser.add_argument("--json-mb", type=float, default=64, help="size of the JSON reader comparison in MB (0: skip)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    serve = work / "serve"
    serve.mkdir(exist_ok=True)
    data = serve / "train.parquet"
    if not data.exists() or abs(data.stat().st_size - args.size_mb * 1e6) > 0.1 * args.size_mb * 1e6:
        start = time.perf_counter()
        rows = make_parquet(data, args.size_mb)
        print(f"generated {data.stat().st_size / 1e6:.1f} MB parquet, {rows} rows, in {time.perf_counter() - start:.1f} s")
    names = shards(data, args.files)
    size = sum((serve / name).stat().st_size for name in names)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(serve), str(args.rate_mb_s)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = [f"http://127.0.0.1:{port}/{name}" for name in names]
    try:
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        plain, step, whole = [], [], []
        for round_ in range(args.rounds):
            plain.append(child(PLAIN, str(work / "plain.parquet"), *urls))
            for i in range(len(urls)):
                (work / f"plain.parquet.{i}").unlink()
            # the order of the two step variants alternates by round
            variants = [("streamed", urls), ("whole", [u.replace(f":{port}/", f":{port}/no-range/") for u in urls])]
            for variant, variant_urls in variants if round_ % 2 == 0 else variants[::-1]:
                (step if variant == "streamed" else whole).append(child(STEP, str(work / "out"), *variant_urls))
            print(f"round {round_ + 1}: plain {plain[-1]['seconds']:.2f} s, step download {step[-1]['download_seconds']:.2f} s, "
                  f"step total {step[-1]['seconds']:.2f} s (whole step / plain "
                  f"{plain[-1]['seconds'] / step[-1]['seconds']:.2f}x), step peak RSS {step[-1]['peak_kb'] / 1024:.0f} MiB; "
                  f"without Range: step total {whole[-1]['seconds']:.2f} s "
                  f"({plain[-1]['seconds'] / whole[-1]['seconds']:.2f}x), peak RSS {whole[-1]['peak_kb'] / 1024:.0f} MiB")
    finally:
        server.terminate()
        server.wait()

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    mb = size / 1e6
    plain_s, download_s, total_s = median(plain, "seconds"), median(step, "download_seconds"), median(step, "seconds")
    rss = median(step, "peak_kb") / 1024
    rate = f", served at {args.rate_mb_s:g} MB/s" if args.rate_mb_s else ""
    print(f"\nfile: {mb:.1f} MB parquet in {len(names)} file(s){rate}, {step[0]['rows']} rows, "
          f"{step[0]['decoded_bytes'] / 1e6:.1f} MB decoded; "
          f"median of {args.rounds}")
    print(f"  plain download     {plain_s:7.2f} s  {mb / plain_s:8.1f} MB/s  peak RSS {median(plain, 'peak_kb') / 1024:5.0f} MiB")
    whole_s, whole_download_s = median(whole, "seconds"), median(whole, "download_seconds")
    print(f"  step end to end    {total_s:7.2f} s  {mb / total_s:8.1f} MB/s  ratio {plain_s / total_s:.2f}x plain "
          f"(aim >= 0.5: {'met' if plain_s / total_s >= 0.5 else 'NOT met'})")
    print(f"  step peak RSS      {rss:7.0f} MiB (aim < 300 MB: {'met' if rss * 2**20 < 300e6 else 'NOT met'})")
    print(f"  step download      {download_s:7.2f} s  {mb / download_s:8.1f} MB/s  ratio {plain_s / download_s:.2f}x plain "
          "(row groups decoded meanwhile)")
    print(f"  without Range      {whole_s:7.2f} s  {mb / whole_s:8.1f} MB/s  ratio {plain_s / whole_s:.2f}x plain "
          f"(each file decoded once complete), peak RSS {median(whole, 'peak_kb') / 1024:.0f} MiB")
    print(f"    its download     {whole_download_s:7.2f} s  {mb / whole_download_s:8.1f} MB/s  ratio "
          f"{plain_s / whole_download_s:.2f}x plain (the download alone; aim >= 0.8: "
          f"{'met' if plain_s / whole_download_s >= 0.8 else 'NOT met'})")
    runs = ", ".join(f"{w['seconds'] / t['seconds']:.2f}" for w, t in zip(whole, step))
    print(f"  streamed / without Range: {whole_s / total_s:.2f}x faster (runs {runs})")
    if args.json_mb > 0:
        print(f"\nJSON readers on the same rows (~{args.json_mb:g} MB each):")
        array_s, lines_s = json_readers(work, data, args.json_mb)
        print(f"  JSON array / JSON lines seconds per MiB: {array_s / lines_s:.2f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
