"""The fetch step's batch path (Arrow compute, vectorised split, streamed row groups) against a
per-row reference written from the definitions: ``formats.normalise_row`` for each row, the
blake2b split per (seed, file, row), the last train row held back for an empty eval set.

The reference reads each file with plain pyarrow/json and shares no code with the step's readers,
``arrow``, ``splits`` or ``buffers`` modules; the fixture mixes every format, edge-case rows
(nulls, blanks of every kind, JSON-looking prompts, non-ASCII text), several files, row groups
that cut the batches, Arrow types the fast path does not take, and a Kaito column mapping.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stepkit.common import StepError
from steps.fetch_dataset import FetchConfig, fetch_dataset
from steps.fetch_dataset.formats import BadRow, estimate_tokens, normalise_row
from steps.fetch_dataset.kaito_dataset_config import ColumnMapping

ROOT = Path(__file__).resolve().parents[3]


def in_eval(seed, file_index: int, row_index: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{file_index}:{row_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def reference(files: list[tuple[Path, str]], eval_fraction: float, seed: int, mapping: ColumnMapping | None = None):
    """What the step must produce, one row at a time."""
    train, evaluation, held = [], [], None
    rows = bad = tokens = 0
    examples = []
    for file_index, (path, fmt) in enumerate(files):
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = pq.read_table(path).to_pylist()
        for row_index, row in enumerate(records):
            rows += 1
            try:
                value = normalise_row(fmt, mapping.apply(row) if mapping else row)
            except BadRow as exc:
                bad += 1
                if len(examples) < 10:
                    examples.append(f"{path.as_uri()} row {row_index}: {exc}")
                continue
            tokens += estimate_tokens(value)
            if in_eval(seed, file_index, row_index, eval_fraction):
                evaluation.append(value)
            else:
                if held is not None:
                    train.append(held)
                held = value
    if held is not None:
        (evaluation if eval_fraction > 0 and not evaluation and train else train).append(held)
    return {"train": train, "eval": evaluation, "rows": rows - bad, "bad_rows": bad, "tokens_estimate": tokens,
            "bad_examples": examples}


def run_step(tmp_path: Path, files: list[tuple[Path, str]], **options) -> dict:
    out = tmp_path / "out"
    summary = fetch_dataset(FetchConfig(url=[p.as_uri() for p, _ in files], output_dir=out, max_bad_fraction=1.0,
                                        **options))
    column = "text" if summary["kind"] == "text" else "messages"
    got = {split: pq.read_table(out / f"{split}.parquet").column(column).to_pylist() for split in ("train", "eval")}
    assert summary["train_rows"] == len(got["train"]) and summary["eval_rows"] == len(got["eval"])
    return {**got, **{k: summary[k] for k in ("rows", "bad_rows", "tokens_estimate", "bad_examples")}}


# --- the fixture ---------------------------------------------------------------------------------

BLANKS = ["", " ", "\t\n", "\u3000", "\x1c\x1f", "\x85", "\xa0 ", "\u2028"]
TEXTS = ["plain words", " leading space", "\ttab first", "é accent first", "\u200bzero-width (not blank)",
         "ünïcode ✓ done", "x", "\x7f delete", "tail \u3000", "中文内容", "a" * 3000]


def _messages_rows(rng) -> list:
    def m(role, content, **extra):
        return {"role": role, "content": content, "weight": 1.0, **extra}

    rows = []
    for i in range(700):
        kind = i % 13
        user, answer = TEXTS[rng.integers(len(TEXTS))], TEXTS[rng.integers(len(TEXTS))]
        if kind == 0:
            rows.append([m("user", BLANKS[i % len(BLANKS)]), m("assistant", answer)])
        elif kind == 1:
            rows.append([m("user", user), m("assistant", BLANKS[i % len(BLANKS)])])
        elif kind == 2:
            rows.append([m("wizard", user), m("assistant", answer)])
        elif kind == 3:
            rows.append([m("system", None), m("user", user), m("assistant", answer)])
        elif kind == 4:
            rows.append([m("user", user), None, m("assistant", answer)])
        elif kind == 5:
            rows.append([] if i % 2 else None)
        elif kind == 6:
            rows.append([m("user", user)])
        elif kind == 7:
            rows.append([m(None, user), m("assistant", answer)])
        elif kind == 8:
            rows.append([m("system", BLANKS[i % len(BLANKS)]), m("user", user), m("assistant", answer)])
        else:
            rows.append([m("system", "Be brief."), m("user", user), m("assistant", answer)])
    return rows


PROMPTS = TEXTS + BLANKS + [None, '[{"role": "user", "content": "as JSON"}]', '  [{"role": "user", "content": "q"}]',
                            '{"not": "a list"}', "[not json", "\u3000[1]", "\x1c{", "[]", " { x"]
COMPLETIONS = TEXTS + BLANKS + [None, '[{"role": "assistant", "content": "as JSON"}]', "{", " ]ok"]


def fixture_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    rng = np.random.default_rng(0)
    files = {}
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.float32())])
    path = tmp_path / "messages.parquet"
    pq.write_table(pa.table({"messages": pa.array(_messages_rows(rng), type=pa.list_(message)),
                             "id": pa.array(range(700))}), path, row_group_size=97)
    files["messages"] = (path, "messages")

    n = 900
    prompts = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=n)]
    completions = [COMPLETIONS[i] for i in rng.integers(len(COMPLETIONS), size=n)]
    for name, kind in (("prompt", pa.string()), ("prompt-large", pa.large_string())):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"prompt": pa.array(prompts, kind), "completion": pa.array(completions, kind)}), path,
                       row_group_size=300)
        files[name] = (path, "prompt")

    path = tmp_path / "sharegpt.parquet"
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human", "value": TEXTS[i % len(TEXTS)]},
                                                            {"from": "gpt" if i % 5 else "bot", "value": "ok"}]}
                                         for i in range(120)]), path)
    files["sharegpt"] = (path, "sharegpt")
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": TEXTS[i % len(TEXTS)], "input": BLANKS[i % 3],
                                          "output": "" if i % 7 == 0 else "fine"} for i in range(120)]), path)
    files["alpaca"] = (path, "alpaca")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts[:200], completions[:200])))
    files["jsonl"] = (path, "prompt")

    texts = [TEXTS[i] if i < len(TEXTS) else BLANKS[i - len(TEXTS)] for i in rng.integers(len(TEXTS) + len(BLANKS), size=800)]
    texts[::37] = [None] * len(texts[::37])
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": pa.array(texts)}), path, row_group_size=101)
    files["text"] = (path, "text")
    path = tmp_path / "text-dict.parquet"  # dictionary-encoded in Arrow: the Python path
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), path)
    files["text-dict"] = (path, "text")
    return files


CHAT = ["messages", "prompt", "sharegpt", "prompt-large", "alpaca", "jsonl"]


@pytest.mark.parametrize(("names", "eval_fraction", "seed"), [
    (CHAT, 0.3, 42),
    (["text", "text-dict"], 0.1, 7),
    (["messages"], 0.0, 42),  # no eval at all
    (["prompt"], 1e-12, 3),  # the split picks no row: the last train row becomes the eval set
], ids=["chat-files", "text-files", "no-eval", "held-row"])
def test_the_step_matches_the_per_row_reference(tmp_path, names, eval_fraction, seed):
    files = fixture_files(tmp_path)
    chosen = [files[n] for n in names]
    expected = reference(chosen, eval_fraction, seed)
    got = run_step(tmp_path, chosen, eval_fraction=eval_fraction, seed=seed)
    assert got == expected
    assert got["bad_rows"] > 0 and got["rows"] > 0
    from steps.fetch_dataset.arrow import canonical

    for path, fmt in chosen:  # both paths took part: Arrow settled some rows and left others to Python
        if path.suffix == ".parquet" and fmt in ("messages", "prompt", "text"):
            settled = canonical(fmt, pq.read_table(path).combine_chunks().to_batches()[0])
            assert settled is None or 0 < settled[0].sum() < len(settled[0]), path.name
    if eval_fraction == 1e-12:
        assert len(got["eval"]) == 1 and got["eval"][0] == expected["eval"][0]


def test_kaito_mapped_columns_match_the_reference(tmp_path):
    files = fixture_files(tmp_path)
    table = pq.read_table(files["prompt"][0])
    path = tmp_path / "mapped.parquet"
    pq.write_table(pa.table({"question": table["prompt"], "answer": table["completion"], "text": table["prompt"]}), path,
                   row_group_size=128)
    mapping = ColumnMapping("prompt", {"prompt": "question", "completion": "answer"},
                            {"prompt": "context_column", "completion": "response_column"})
    config = tmp_path / "training_config.yaml"
    config.write_text("training_config:\n  DatasetConfig:\n    context_column: question\n    response_column: answer\n")
    expected = reference([(path, "prompt")], 0.1, 42, mapping)
    assert run_step(tmp_path, [(path, "prompt")], config=config) == expected


def test_a_one_row_dataset_keeps_its_row_where_the_split_put_it(tmp_path):
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"text": ["only row"]}), path)
    for seed in (42, 1):  # row 0 goes to eval with seed 42, to train with seed 1 (not moved: no second row)
        assert in_eval(seed, 0, 0, 0.1) == (seed == 42)
        got = run_step(tmp_path, [(path, "text")], seed=seed)
        assert got == reference([(path, "text")], 0.1, seed)
        assert (got["train"], got["eval"]) == (([], ["only row"]) if seed == 42 else (["only row"], []))


def test_the_split_is_pinned(tmp_path):
    """The rows kaiflow has always sent to eval (seed 42, eval fraction 0.1, first file): a change of
    hash, key or comparison would move them, and every rerun of a pipeline would train on other rows."""
    path = tmp_path / "pinned.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(200)]}), path, row_group_size=64)
    got = run_step(tmp_path, [(path, "text")], eval_fraction=0.1, seed=42)
    pinned = [0, 4, 18, 21, 34, 43, 52, 58, 59, 73, 83, 106, 125, 138, 147, 158, 167, 175, 182, 183, 193]
    assert got["eval"] == [f"row {i}" for i in pinned]
    assert got["train"] == [f"row {i}" for i in range(200) if i not in pinned]


# --- the vectorised split --------------------------------------------------------------------------


def test_eval_mask_is_the_per_row_definition():
    from steps.fetch_dataset.splits import eval_mask, to_eval

    rows = np.concatenate([np.arange(0, 2000), *(np.arange(10**k - 50, 10**k + 50) for k in range(4, 13))])
    for seed, file_index, fraction in ((42, 0, 0.1), (7, 3, 0.5), (-1, 12, 0.25), (10**150, 1, 0.3), (42, 0, 1e-3),
                                       (42, 0, 0.0), (42, 1, 1.0)):
        want = np.array([in_eval(seed, file_index, int(r), fraction) for r in rows])
        assert (eval_mask(seed, file_index, rows, fraction) == want).all(), (seed, file_index, fraction)
        assert [to_eval(seed, file_index, int(r), fraction) for r in rows[:300]] == want[:300].tolist()
    assert eval_mask(42, 0, np.arange(100, 200)[::-3], 0.2).tolist() == [in_eval(42, 0, r, 0.2) for r in range(199, 99, -3)]


def test_uint64_to_float_rounds_like_python_int_division():
    """eval_mask compares ``digest.astype(float64) / 2**64``; Python divides the int: both must round
    the same way, ties included."""
    rng = np.random.default_rng(1)
    values = [0, 1, 2**53 + 1, 2**53 + 3, 2**63 + 2**10, 2**63 + 3 * 2**10, 2**64 - 1, 2**64 - 2**10, 2**64 - 2**10 - 1]
    values += [int(x) for x in rng.integers(0, 2**63, size=2000, dtype=np.uint64)]
    values += [(int(x) << 11) | (1 << 10) for x in rng.integers(0, 2**53, size=2000, dtype=np.uint64)]  # exact ties
    array = np.array(values, dtype=np.uint64)
    assert (array.astype(np.float64) / 2.0**64).tolist() == [v / 2**64 for v in values]


# --- buffers and row sizes ---------------------------------------------------------------------


def _nested_arrays() -> list:
    message = pa.struct([("role", pa.string()), ("content", pa.large_string())])
    lists = pa.array([[{"role": "user", "content": "hé"}], None, [], [None, {"role": None, "content": "xyz"}]] * 5,
                     type=pa.list_(message))
    return [
        pa.array(["a", None, "ccc", "", "ééé"] * 7).slice(3, 20),
        pa.array([b"x", None, b"yy"] * 5, type=pa.large_binary()).slice(1),
        lists.slice(3, 13),
        pa.array([[["a", "b"], None], None, [["ccc"]]] * 4, type=pa.large_list(pa.list_(pa.string()))).slice(2),
        pa.StructArray.from_arrays([pa.array(["a", "bb", None]), pa.array([1, 2, 3], pa.int32())], names=["s", "i"],
                                   mask=pa.array([False, True, False])),
        pa.array(["one", "three", None, "one"] * 3).dictionary_encode().slice(1),
        pa.array([1, None, 3], pa.int64()),
    ]


def _old_row_sizes(array):
    """row_sizes as it was written first: binary_length, flatten and list_parent_indices."""
    n = len(array)
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return np.array([0 if v is None else v for v in pc.binary_length(array).to_pylist()], dtype=np.int64)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        child = _old_row_sizes(array.flatten())
        parents = np.array(pc.list_parent_indices(array).to_pylist(), dtype=np.int64)
        return np.bincount(parents, weights=child, minlength=n).astype(np.int64)
    if pa.types.is_struct(kind):
        return sum((_old_row_sizes(child) for child in array.flatten()), np.zeros(n, dtype=np.int64))
    if pa.types.is_dictionary(kind):
        sizes = _old_row_sizes(array.dictionary)
        return np.array([0 if i is None else sizes[i] for i in array.indices.to_pylist()], dtype=np.int64)
    return np.full(n, kind.bit_width // 8, dtype=np.int64)


@pytest.mark.parametrize("index", range(len(_nested_arrays())))
def test_row_sizes_from_offsets_match_the_kernels(index):
    from steps.fetch_dataset.readers import row_sizes

    array = _nested_arrays()[index]
    assert row_sizes(array).tolist() == _old_row_sizes(array).tolist()


def test_buffer_views_handle_offsets_and_nulls():
    from steps.fetch_dataset import buffers

    strings = pa.array([None if i % 3 == 0 else "ab" * (i % 5) for i in range(50)]).slice(11, 30)
    assert buffers.valid(strings).tolist() == strings.is_valid().to_pylist()
    flags = pa.array([None if i % 4 == 0 else bool(i % 3) for i in range(40)]).slice(5, 27)
    assert buffers.booleans(flags).tolist() == [bool(v) for v in flags.to_pylist()]
    numbers = pa.array([None if i % 5 == 0 else i - 20 for i in range(40)], pa.int32()).slice(9)
    assert buffers.integers(numbers, null=-7).tolist() == [-7 if v is None else v for v in numbers.to_pylist()]
    ends = buffers.offsets(strings)
    assert np.diff(ends).tolist() == [len(v or "") for v in strings.to_pylist()]
    mask = np.arange(19) % 3 == 1
    assert buffers.arrow_booleans(mask).to_pylist() == mask.tolist()
    assert buffers.arrow_integers(np.arange(5) * 3, pa.int32()).to_pylist() == [0, 3, 6, 9, 12]
    assert buffers.arrow_strings(["é", "", "xyz"], pa.large_string()).to_pylist() == ["é", "", "xyz"]


# --- failures on the writer thread, and imports ----------------------------------------------------


def test_a_failed_write_fails_the_step_and_leaves_the_outputs(tmp_path, monkeypatch):
    import pyarrow.parquet as parquet

    import steps.fetch_dataset.splits as splits

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(500)]}), path)
    monkeypatch.setattr(splits, "ROW_GROUP_ROWS", 50)  # several row groups, so writes happen mid-run
    calls = []

    def failing(self, table, row_group_size=None):
        calls.append(len(table))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parquet.ParquetWriter, "write_table", failing)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous")
    with pytest.raises(OSError, match="No space left on device"):
        fetch_dataset(FetchConfig(url=[path.as_uri()], output_dir=out))
    assert calls, "a write was attempted"
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"previous"


def test_the_arrow_path_does_not_import_pandas(tmp_path):
    """pyarrow's to_numpy and pa.array import pandas on first use (0.2 s or more); the step's
    Arrow path reads buffers instead, and a run over chat rows never loads it."""
    chat, prompt = tmp_path / "chat.parquet", tmp_path / "prompt.parquet"
    texts = [t for t in TEXTS] * 20  # leading blanks and non-ASCII text: the regex and utf8_length run too
    pq.write_table(pa.table({"messages": [[{"role": "system", "content": " "}, {"role": "user", "content": t},
                                           {"role": "assistant", "content": t[::-1]}] for t in texts]}), chat)
    pq.write_table(pa.table({"prompt": texts, "completion": texts[::-1]}), prompt)
    code = ("import sys; from pathlib import Path; from steps.fetch_dataset import FetchConfig, fetch_dataset; "
            f"summary = fetch_dataset(FetchConfig(url=[{chat.as_uri()!r}, {prompt.as_uri()!r}], "
            f"output_dir=Path({str(tmp_path / 'out')!r}))); "
            "print(summary['rows'], summary['eval_rows'] > 0, 'pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{2 * len(TEXTS) * 20} True False"


def test_the_bad_row_cap_still_fails_with_the_first_bad_row(tmp_path):
    files = fixture_files(tmp_path)
    with pytest.raises(StepError, match=r"rows are bad .*; first: .*messages\.parquet row 0: message 0 is an empty user turn"):
        fetch_dataset(FetchConfig(url=[files["messages"][0].as_uri()], output_dir=tmp_path / "out"))
