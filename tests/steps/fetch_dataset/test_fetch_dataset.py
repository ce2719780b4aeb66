"""steps.fetch_dataset against a real local HTTP server and file:// URLs: formats and failures."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepkit.common import RetryableError, StepError, read_output, run_step
from steps.fetch_dataset import FetchConfig, fetch_dataset, main

QA = [("What is the capital of France?", "Paris."), ("Name a primary colour.", "Red."), ("2 + 2?", "4.")] * 10

FORMAT_ROWS = {
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
    "alpaca": [{"instruction": q, "input": "" if i % 2 else "Answer in one word.", "output": a} for i, (q, a) in enumerate(QA)],
    "prompt": [{"prompt": q, "completion": a} for q, a in QA],
    "text": [{"text": f"{q} {a}"} for q, a in QA],
}


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def run(tmp_path, *urls, **options) -> dict:
    return fetch_dataset(FetchConfig(url=list(urls), output_dir=tmp_path / "out", retries=options.pop("retries", 2), **options))


def read_split(tmp_path, split: str) -> list[dict]:
    return pq.read_table(tmp_path / "out" / f"{split}.parquet").to_pylist()


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_over_http_is_normalised(http_files, tmp_path, fmt):
    data = parquet_bytes(FORMAT_ROWS[fmt])
    summary = run(tmp_path, http_files.add(f"{fmt}.parquet", data))
    assert summary["format"] == fmt
    assert summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert summary["rows"] == len(QA) == summary["train_rows"] + summary["eval_rows"]
    assert summary["eval_rows"] >= 1 and summary["bad_rows"] == 0
    rows = read_split(tmp_path, "train") + read_split(tmp_path, "eval")
    if fmt == "text":
        assert {r["text"] for r in rows} == {f"{q} {a}" for q, a in QA}
        return
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-2:] == ["user", "assistant"]
        assert row["messages"][-1]["content"] in {a for _, a in QA}
    if fmt == "alpaca":
        assert any(m["content"].endswith("\n\nAnswer in one word.") for r in rows for m in r["messages"])


def test_file_url_jsonl_json_and_csv(tmp_path):
    rows = FORMAT_ROWS["messages"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    array = tmp_path / "d.json"
    array.write_text(json.dumps(FORMAT_ROWS["prompt"], indent=1))
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\n" + "".join(f'"{q}",,"{a}"\n' for q, a in QA))
    for path, fmt in ((jsonl, "messages"), (array, "prompt"), (csv, "alpaca")):
        summary = run(tmp_path, path.as_uri())
        assert (summary["format"], summary["rows"]) == (fmt, len(QA)), path
        assert summary["digest"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_several_urls_digest_and_cli_outputs(http_files, tmp_path):
    a = parquet_bytes(FORMAT_ROWS["messages"])
    b = parquet_bytes(FORMAT_ROWS["sharegpt"])
    urls = [http_files.add("multi-a.parquet", a), http_files.add("multi-b.parquet", b)]
    outputs = tmp_path / "outputs"
    argv = [x for u in urls for x in ("--url", u)] + ["--output-dir", str(tmp_path / "out"), "--outputs", str(outputs)]
    assert run_step(main, argv) == 0
    lines = f"sha256:{hashlib.sha256(a).hexdigest()}\nsha256:{hashlib.sha256(b).hexdigest()}\n"
    assert read_output(outputs, "dataset-digest") == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    summary = json.loads(read_output(outputs, "summary"))
    assert summary["rows"] == 2 * len(QA) and summary["kind"] == "chat" and summary["tokens_estimate"] > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["files"][1]["format"] == "sharegpt"


def test_content_type_decides_when_the_url_has_no_extension(http_files, tmp_path):
    url = http_files.add("by-type", parquet_bytes(FORMAT_ROWS["text"]), "application/vnd.apache.parquet")
    assert run(tmp_path, url)["format"] == "text"


def test_dropped_connection_resumes_with_a_range_request(http_files, tmp_path):
    data = parquet_bytes(FORMAT_ROWS["messages"] * 40)
    http_files.add("dropped.parquet", data)
    summary = run(tmp_path, http_files.url("dropped.parquet", "drop-once"))
    assert summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    ranges = [r for _, r in http_files.requests_for("dropped.parquet") if r]
    assert ranges == [f"bytes={len(data) // 2}-"]


def test_dropped_connection_without_range_support_restarts(http_files, tmp_path):
    data = parquet_bytes(FORMAT_ROWS["text"] * 40)
    http_files.add("norange.parquet", data)
    summary = run(tmp_path, http_files.url("norange.parquet", "no-range/drop-once"))
    assert summary["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()


def test_server_errors_are_retried(http_files, tmp_path):
    http_files.add("flaky.parquet", parquet_bytes(FORMAT_ROWS["prompt"]))
    assert run(tmp_path, f"{http_files.base}/flaky/503/2/flaky.parquet")["rows"] == len(QA)


# --- the corpus of broken inputs: each fails with its own clear message -------------------------


def expect_error(tmp_path, url, match, retryable=False, **options):
    with pytest.raises(StepError, match=match) as error:
        run(tmp_path, url, **options)
    assert isinstance(error.value, RetryableError) == retryable, "exit 1 (retried) only for failures that may pass"
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_truncated_parquet(http_files, tmp_path):
    data = parquet_bytes(FORMAT_ROWS["messages"])
    expect_error(tmp_path, http_files.add("truncated.parquet", data[: len(data) // 2]), r"truncated\.parquet.*not a readable parquet file")


def test_wrong_columns(http_files, tmp_path):
    url = http_files.add("wrong.parquet", parquet_bytes([{"question": "q", "answer": "a"}]))
    expect_error(tmp_path, url, r"wrong\.parquet.*columns \['answer', 'question'\] fit no accepted format")


def test_empty_assistant_turns_name_file_and_row(http_files, tmp_path):
    rows = [{"prompt": q, "completion": "" if i % 2 else a} for i, (q, a) in enumerate(QA)]
    expect_error(tmp_path, http_files.add("empty-turns.parquet", parquet_bytes(rows)), r"15 of 30 rows are bad.*empty-turns\.parquet row 1: message 1 is an empty assistant turn")


def test_unknown_role_is_reported(tmp_path):
    path = tmp_path / "roles.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}) + "\n")
    expect_error(tmp_path, path.as_uri(), r"roles\.jsonl row 0: message 0 has an unknown role \(expected")  # the value is row content: not echoed


def test_a_few_bad_rows_are_tolerated(http_files, tmp_path):
    rows = FORMAT_ROWS["prompt"] + [{"prompt": "q", "completion": ""}]
    summary = run(tmp_path, http_files.add("one-bad.parquet", parquet_bytes(rows)), max_bad_fraction=0.1)
    assert (summary["rows"], summary["bad_rows"]) == (len(QA), 1)
    assert "one-bad.parquet row 30: message 1 is an empty assistant turn" in summary["bad_examples"][0]


def test_not_found(http_files, tmp_path):
    expect_error(tmp_path, http_files.url("missing.parquet"), r"missing\.parquet.*HTTP 404")


def test_oversized_by_content_length(http_files, tmp_path):
    url = http_files.add("big.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    expect_error(tmp_path, url, r"big\.parquet.*exceeds the size cap of 100 bytes", max_bytes=100)


def test_oversized_file_url(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("x" * 1000)
    expect_error(tmp_path, path.as_uri(), r"exceeds the size cap of 10 bytes", max_bytes=10)


def test_timeout_is_reported(http_files, tmp_path):
    url = http_files.add("slow.parquet", parquet_bytes(FORMAT_ROWS["text"]))
    expect_error(tmp_path, http_files.url("slow.parquet", "stall"), r"slow\.parquet.*failed after 1 attempts.*ReadTimeout", retryable=True,
                 timeout=0.3, retries=0)
    assert url


def test_persistent_server_error(http_files, tmp_path):
    expect_error(tmp_path, f"{http_files.base}/status/500", r"failed after 2 attempts, last error: HTTP 500",
                 retryable=True, retries=1)


def test_cli_exit_codes_tell_retryable_from_bad_input(http_files, tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "out"), "--retries", "0", "--outputs", str(tmp_path / "o")]
    assert run_step(main, ["--url", f"{http_files.base}/status/503", *argv]) == 1
    assert "failed after 1 attempts, last error: HTTP 503" in capsys.readouterr().err
    assert run_step(main, ["--url", http_files.url("missing.parquet"), *argv]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_mixed_chat_and_text_files(http_files, tmp_path):
    a = http_files.add("mix-a.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    b = http_files.add("mix-b.parquet", parquet_bytes(FORMAT_ROWS["text"]))
    with pytest.raises(StepError, match="mix chat and plain-text"):
        run(tmp_path, a, b)


def test_mixed_formats_error_names_each_file_read_so_far(http_files, tmp_path):
    a = http_files.add("mix2-a.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    b = http_files.add("mix2-b.parquet", parquet_bytes(FORMAT_ROWS["prompt"]))
    c = http_files.add("mix2-c.parquet", parquet_bytes(FORMAT_ROWS["text"]))
    with pytest.raises(StepError) as err:
        run(tmp_path, a, b, c)
    assert str(err.value).endswith(f"{a} (messages), {b} (prompt), {c} (text)")
    assert not (tmp_path / "out" / "train.parquet").exists()


def _wait_for(condition, what: str, bound_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound_s} s: {what}")
        time.sleep(0.02)


def test_a_file_is_decoded_while_the_next_one_downloads(http_files, tmp_path, monkeypatch):
    """The second file's server holds back half its body until the first file is through the step:
    the Argo progress (downloads + files decoded, of 2 per URL) reaches 2/4 meanwhile."""
    import threading

    progress = tmp_path / "progress"
    monkeypatch.setenv("ARGO_PROGRESS_FILE", str(progress))
    first = http_files.add("ahead-1.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    http_files.add("ahead-2.parquet", parquet_bytes(FORMAT_ROWS["sharegpt"]))
    second = http_files.url("ahead-2.parquet", mode="held")
    outcome: dict = {}

    def step() -> None:
        try:
            outcome["summary"] = run(tmp_path, first, second)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=step)
    worker.start()
    try:
        # held until released below: seen together only if the first is decoded during the second's download
        _wait_for(lambda: http_files.holding("ahead-2.parquet") and progress.exists()
                  and progress.read_text() == "2/4\n", "the first file decoded while the second is held")
        assert worker.is_alive()
    finally:
        http_files.release("ahead-2.parquet")
        worker.join(120)
    assert "error" not in outcome, outcome
    summary = outcome["summary"]
    assert [f["format"] for f in summary["files"]] == ["messages", "sharegpt"]
    assert summary["rows"] == 2 * len(QA) and progress.read_text() == "4/4\n"


def test_a_file_that_fails_stops_the_downloads_after_it(http_files, tmp_path, monkeypatch):
    """The second file is held mid-body until the step, failing on the first, has asked the
    downloads to stop; released then, its download gives up at its next chunk and the third
    file is never asked for."""
    import threading

    import steps.fetch_dataset as fd

    stopping = threading.Event()
    close = fd._Downloads.close

    def close_and_tell(self) -> None:
        self._stop.set()
        stopping.set()
        close(self)

    monkeypatch.setattr(fd._Downloads, "close", close_and_tell)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.parquet").write_bytes(b"the previous dataset")
    bad = http_files.add("stops-1.parquet", parquet_bytes([{"foo": 1}, {"foo": 2}]))
    http_files.add("stops-2.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    later = http_files.add("stops-3.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    outcome: dict = {}

    def step() -> None:
        try:
            run(tmp_path, bad, http_files.url("stops-2.parquet", mode="held"), later, retries=3)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    worker = threading.Thread(target=step)
    worker.start()
    try:
        assert stopping.wait(60), "the step did not stop its downloads after the first file failed"
    finally:
        http_files.release("stops-2.parquet")
        worker.join(120)
    assert isinstance(outcome.get("error"), StepError) and "stops-1.parquet" in str(outcome["error"]), outcome
    assert len(http_files.requests_for("stops-2.parquet")) <= 1  # not retried after the stop
    assert http_files.requests_for("stops-3.parquet") == []
    assert (tmp_path / "out" / "train.parquet").read_bytes() == b"the previous dataset"


def test_a_later_download_that_fails_fails_the_step_and_keeps_the_output(http_files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.parquet").write_bytes(b"the previous dataset")
    good = http_files.add("later-1.parquet", parquet_bytes(FORMAT_ROWS["messages"]))
    with pytest.raises(StepError, match="later-2.parquet.*HTTP 404"):
        run(tmp_path, good, http_files.url("later-2.parquet"))
    assert (tmp_path / "out" / "train.parquet").read_bytes() == b"the previous dataset"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.parquet"]


def test_bad_scheme_and_cli_exit_code(tmp_path, capsys):
    assert run_step(main, ["--url", "ftp://example.invalid/x.parquet", "--output-dir", str(tmp_path)]) == 2
    assert "unsupported scheme 'ftp'" in capsys.readouterr().err


# --- Arrow IPC files ---------------------------------------------------------------------------


def arrow_bytes(rows: list[dict], stream: bool) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    return sink.getvalue()


@pytest.mark.parametrize("stream", [False, True], ids=["file", "stream"])
def test_arrow_ipc_file_and_stream(http_files, tmp_path, stream):
    data = arrow_bytes(FORMAT_ROWS["sharegpt"], stream)
    named = run(tmp_path, http_files.add(f"d-{stream}.arrow", data))
    assert (named["format"], named["rows"]) == ("sharegpt", len(QA))
    # no extension, no content type: told by its first bytes
    sniffed = run(tmp_path, http_files.add(f"d-{stream}-noext", data))
    assert (sniffed["format"], sniffed["rows"]) == ("sharegpt", len(QA))
    assert sorted(m["content"] for r in read_split(tmp_path, "train") + read_split(tmp_path, "eval")
                  for m in r["messages"]) == sorted(x for q, a in QA for x in (q, a))


# --- Kaito's DatasetConfig (--config) ------------------------------------------------------------


def write_config(tmp_path, dataset_config: str, configmap: bool = False):
    body = "training_config:\n  LoraConfig:\n    r: 8\n  DatasetConfig:\n" + "".join(
        f"    {line}\n" for line in dataset_config.strip().splitlines())
    path = tmp_path / "training_config.yaml"
    if configmap:
        indented = "".join(f"    {line}\n" for line in body.splitlines())
        path.write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tuning\ndata:\n  training_config.yaml: |\n{indented}")
    else:
        path.write_text(body)
    return path


def test_kaito_messages_column_split_and_seed_through_the_cli(http_files, tmp_path):
    rows = [{"id": i, "conversation": json.dumps(r["messages"])} for i, r in enumerate(FORMAT_ROWS["messages"])]
    url = http_files.add("kaito-messages.parquet", parquet_bytes(rows))
    config = write_config(tmp_path, "messages_column: conversation\ntrain_test_split: 0.8\nshuffle_seed: 7\n"
                                    "shuffle_dataset: true\ndataset_path: /mnt/data", configmap=True)
    outputs = tmp_path / "outputs"
    argv = ["--url", url, "--output-dir", str(tmp_path / "out"), "--config", str(config), "--outputs", str(outputs)]
    assert run_step(main, argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["format"], summary["rows"], summary["eval_fraction"]) == ("messages", len(QA), 0.2)
    assert any("shuffle_seed 7" in n for n in summary["config_notes"])
    assert any("dataset_path ignored" in n for n in summary["config_notes"])
    assert read_split(tmp_path, "train")[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    # the config's split and seed are the flags' --eval-fraction and --seed
    again = run(tmp_path, url, seed=7, eval_fraction=0.2, config=write_config(tmp_path, "messages_column: conversation"))
    assert again["eval_rows"] == summary["eval_rows"]


def test_kaito_context_and_response_columns_make_prompt_completion(http_files, tmp_path):
    rows = [{"question": q, "answer": a, "text": "unused"} for q, a in QA]
    url = http_files.add("kaito-ctx.parquet", parquet_bytes(rows))
    summary = run(tmp_path, url, config=write_config(tmp_path, "context_column: question\nresponse_column: answer\n"
                                                               "train_test_split: 1"))
    assert (summary["format"], summary["kind"], summary["eval_rows"]) == ("prompt", "chat", 0)
    first = read_split(tmp_path, "train")[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and (first[0]["content"], first[1]["content"]) in QA


def test_kaito_response_column_alone_is_text_and_extension_tells_the_type(http_files, tmp_path):
    body = "".join(json.dumps({"body": f"{q} {a}"}) + "\n" for q, a in QA).encode()
    url = http_files.add("kaito-text-noext", body)
    summary = run(tmp_path, url, config=write_config(tmp_path, "response_column: body\ndataset_extension: jsonl"))
    assert (summary["format"], summary["rows"]) == ("text", len(QA))


@pytest.mark.parametrize(("dataset_config", "match"), [
    ("messages_column: chat", r"DatasetConfig.messages_column 'chat' is not a column of the file \(columns: prompt, completion\)"),
    ("messages_colum: chat", r"training_config.DatasetConfig.messages_colum: unknown key \(did you mean 'messages_column'\?\)"),
    ("train_test_split: 0.2", r"DatasetConfig.train_test_split: must be a number from 0.5 to 1"),
    ("context_column: prompt", r"DatasetConfig.context_column: needs response_column too"),
    ("dataset_extension: xml", r"DatasetConfig.dataset_extension: must be one of"),
])
def test_kaito_dataset_config_errors_name_the_key(http_files, tmp_path, dataset_config, match):
    url = http_files.add("kaito-bad.parquet", parquet_bytes(FORMAT_ROWS["prompt"]))
    with pytest.raises(StepError, match=match):
        run(tmp_path, url, config=write_config(tmp_path, dataset_config))


# --- atomic outputs ----------------------------------------------------------------------------


def test_outputs_replace_the_previous_run_atomically(http_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"old")
    (out / "summary.json").write_text("old")
    url = http_files.add("atomic.parquet", parquet_bytes(FORMAT_ROWS["text"]))
    summary = run(tmp_path, url)
    assert len(read_split(tmp_path, "train")) == summary["train_rows"]
    assert json.loads((out / "summary.json").read_text())["digest"] == summary["digest"]
    assert sorted(p.name for p in out.iterdir()) == ["eval.parquet", "summary.json", "train.parquet"]


def test_too_many_bad_rows_leave_the_previous_outputs(http_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"old")
    rows = [{"prompt": q, "completion": ""} for q, _ in QA]
    with pytest.raises(StepError, match="no usable rows"):
        run(tmp_path, http_files.add("all-bad.parquet", parquet_bytes(rows)))
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"old"


# --- the JSON-array reader ---------------------------------------------------------------------


def test_json_array_reader_across_tiny_reads(tmp_path, monkeypatch):
    import steps.fetch_dataset.readers as readers

    values = [{"text": "a" * n, "n": n} for n in range(0, 60, 7)] + [12345678901234, "x", [1, [2]], None, 1.5e300]
    path = tmp_path / "a.json"
    path.write_text(" [\n" + " ,\n ".join(json.dumps(v) for v in values) + "\n]\n")
    monkeypatch.setattr(readers, "JSON_READ", 5)  # every element straddles several reads
    got = list(readers.iter_json_array(path, 1 << 20, StepError))
    assert [v for v, _ in got] == values
    assert [n for _, n in got] == [len(json.dumps(v)) for v in values]
    path.write_text('[{"text": "x"}, {"text": ')
    with pytest.raises(StepError, match="row 1: invalid or truncated JSON array"):
        list(readers.iter_json_array(path, 1 << 20, StepError))


def test_an_unforeseen_exception_exits_2_once_without_traceback(http_files, tmp_path, capsys, monkeypatch):
    import steps.fetch_dataset as step

    def broken(fmt, row):
        raise RuntimeError("bug near https://host/x.parquet?sig=SECRET")

    monkeypatch.setattr(step, "normalise_row", broken)
    monkeypatch.setattr(step, "canonical", lambda fmt, columns: None)  # every row through normalise_row
    url = http_files.add("unforeseen.parquet", parquet_bytes(FORMAT_ROWS["prompt"]))
    out = tmp_path / "out"
    assert run_step(main, ["--url", url, "--output-dir", str(out), "--outputs", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: bug near https://host/x.parquet?sig=***" in err
    assert "Traceback" not in err and "SECRET" not in err
    assert not out.exists() or not list(out.iterdir())


# --- the Arrow path agrees with the Python path --------------------------------------------------


def _messages_rows() -> list:
    def m(role, content, **extra):
        return {"role": role, "content": content, **extra}

    good = [m("system", "Be brief."), m("user", "hi"), m("assistant", "hello")]
    return [
        good, good,
        [m("user", "q"), m("assistant", "   ")],  # blank assistant turn
        [m("user", "\u3000\x1c"), m("assistant", "a")],  # blank user turn (Unicode and \x1c whitespace)
        [m("wizard", "q"), m("assistant", "a")],  # unknown role
        [m("system", None), m("user", "q"), m("assistant", "a")],  # null system content: "" in Python
        [m("user", "q"), None, m("assistant", "a")],  # a null message
        [],  # no messages
        None,  # a null row
        [m("user", "only a question")],  # no assistant turn
        [m("system", "  "), m("user", "é\u200b"), m("assistant", "ünïcode ✓")],
        good,
    ] * 40


@pytest.mark.parametrize("fmt", ["messages", "prompt", "text"])
def test_arrow_path_matches_the_python_path(tmp_path, monkeypatch, fmt):
    import steps.fetch_dataset as step

    if fmt == "messages":
        message = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.float32())])
        rows = [None if r is None else [None if x is None else {**x, "weight": 1.0} for x in r] for r in _messages_rows()]
        table = pa.table({"messages": pa.array(rows, type=pa.list_(message)), "id": pa.array(range(len(rows)))})
    elif fmt == "prompt":
        prompts = ["q?", " q", "", None, "\u3000", '[{"role": "user", "content": "j"}]', "{", " [x", "é", "\x1c{"] * 45
        completions = ["a.", "", " a", None, "[]", "ok", '[{"role": "assistant", "content": "j"}]', "\xa0", "b", "c"] * 45
        table = pa.table({"prompt": prompts, "completion": pa.array(completions, type=pa.large_string())})
    else:
        texts = ["a sentence.", "", "  \t", None, "\x1f", "é", "\u3000x", "ok"] * 60
        table = pa.table({"text": pa.array(texts, type=pa.large_string())})
    path = tmp_path / f"{fmt}.parquet"
    pq.write_table(table, path, row_group_size=97)  # several batches, runs crossing them

    def fetch(out, arrow: bool):
        if not arrow:
            monkeypatch.setattr(step, "canonical", lambda fmt, columns: None)
        summary = fetch_dataset(FetchConfig(url=[path.as_uri()], output_dir=tmp_path / out, max_bad_fraction=1.0,
                                            eval_fraction=0.3))
        monkeypatch.undo()
        splits = {s: pq.read_table(tmp_path / out / f"{s}.parquet") for s in ("train", "eval")}
        return summary, splits

    fast, fast_splits = fetch("fast", arrow=True)
    slow, slow_splits = fetch("slow", arrow=False)
    assert fast == slow
    for split in ("train", "eval"):
        assert fast_splits[split].schema == slow_splits[split].schema
        assert fast_splits[split].to_pylist() == slow_splits[split].to_pylist()
    assert 0 < fast["bad_rows"] < fast["rows"] + fast["bad_rows"]
    certainly_good = step.canonical(fmt, table.combine_chunks().to_batches()[0])[0]
    assert 0 < certainly_good.sum() <= fast["rows"], "the Arrow path took part"
