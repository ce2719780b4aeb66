"""Data-parallel tuning: two processes on the CPU (gloo) with the tiny model, against one process.

The runs go through the real launcher (``python -m steps.tune --nproc 2``: torch's elastic
launcher, two ranks). A ``sitecustomize.py`` on ``PYTHONPATH`` (``hook_env``) makes a chosen rank
fail or hold still at a chosen step, so that killing and failing happen at a known point rather
than after a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.tune.parallel import first_failure, split_batch
from tests.steps.tune.runs import TINY, chat_rows, make_dataset, tune_argv

ROOT = Path(__file__).resolve().parents[3]
# Runs of one process and of two ranks with the same global batch agree to this (absolute, in
# loss units); measured: at most 1e-6 over 17 steps (only the reduction order differs).
TOLERANCE = 1e-3

NO_DROPOUT = "training_config:\n  LoraConfig:\n    lora_dropout: 0.0\n"

HOOK = '''
import os, time
from pathlib import Path
_what = os.environ.get("KAIFLOW_TEST_HOOK", "")
if _what and os.environ.get("RANK") == os.environ.get("KAIFLOW_TEST_HOOK_RANK"):
    if _what == "fail":
        from stepkit.common import StepError
        import steps.tune.parallel as _parallel
        _add = _parallel.SampleCounter.add
        def add(self, inputs):
            if self.examples >= 2:
                raise StepError("row 7 of the shard is corrupt (injected)")
            return _add(self, inputs)
        _parallel.SampleCounter.add = add
    elif _what == "hold":
        import steps.tune.model as _model
        _report = _model.report_progress
        def report_progress(done, total):
            _report(done, total)
            if done == int(os.environ["KAIFLOW_TEST_HOOK_STEP"]):
                Path(os.environ["KAIFLOW_TEST_HOOK_FLAG"]).write_text("held")
                while True:
                    time.sleep(1)
        _model.report_progress = report_progress
'''


@pytest.fixture(scope="module")
def distinct_data(tmp_path_factory):
    """34 training rows, all different (so the union of the ranks' shards can be compared)."""
    rows = chat_rows(40)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] += f" (#{i})"
    work = tmp_path_factory.mktemp("dp-data")
    data = make_dataset(work, rows)
    (work / "no-dropout.yaml").write_text(NO_DROPOUT)
    return data


def hook_env(tmp_path: Path, **hook: str) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(hooks)]), KAIFLOW_OUTPUTS=str(tmp_path / "outputs"))
    env.update({f"KAIFLOW_TEST_HOOK{'_' + k.upper() if k != 'what' else ''}": v for k, v in hook.items()})
    return env


def tune_cmd(tmp_path: Path, data: Path, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "steps.tune", *tune_argv(
        tmp_path, TINY, "lora", data, "--nproc", str(nproc), "--batch-size", "2", "--max-length", "128",
        "--learning-rate", "0.01", "--config", str(data.parent / "no-dropout.yaml"), *extra)]


def run_tune(tmp_path: Path, data: Path, nproc: int, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(tune_cmd(tmp_path, data, nproc, *extra), cwd=ROOT, env=env or hook_env(tmp_path),
                          capture_output=True, text=True, timeout=600)


def adapter_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, distinct_data):
    """The same tune (global batch 2, one epoch) as one process and as two ranks of one sequence each."""
    runs = {}
    for nproc in (1, 2):
        work = tmp_path_factory.mktemp(f"dp-{nproc}")
        done = run_tune(work, distinct_data, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = (work, done.stderr)
    return runs


def test_two_ranks_share_the_dataset_and_train_one_adapter(one_and_two, distinct_data):
    work, log = one_and_two[2]
    info = json.loads((work / "adapter" / "kaiflow.json").read_text())
    assert info["parallel"] == {"processes": 2, "global_batch": 2, "per_process_batch": 1,
                                "per_process_gradient_accumulation_steps": 1}
    metrics = info["metrics"]
    train_rows = json.loads((distinct_data / "summary.json").read_text())["train_rows"]
    # both ranks trained, each on its own half: the union of the shards is the dataset
    assert [r["rank"] for r in metrics["ranks"]] == [0, 1] and all(r["examples"] > 0 for r in metrics["ranks"])
    assert metrics["examples"] == metrics["examples_distinct"] == train_rows
    for rank in (0, 1):
        assert f"rank {rank} of 2 trained on {metrics['ranks'][rank]['examples']} examples" in log
    assert metrics["replicas_identical"] is True  # gradients were all-reduced
    assert metrics["eval_loss"] < metrics["eval_loss_initial"] and metrics["train_loss"] < metrics["train_loss_first"]
    # rank 0 alone wrote the adapter folder, the reports, the outputs and the checkpoints' markers
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".adapter")) == []
    assert (work / "outputs" / "train-loss").is_file() and (work / "adapter" / "loss.png").is_file()
    assert log.count("adapter written to") == 1 and log.count("held-out loss before training") <= 1


def test_two_ranks_match_one_process_with_the_same_global_batch(one_and_two):
    one, two = (json.loads((one_and_two[n][0] / "adapter" / "loss.json").read_text()) for n in (1, 2))
    assert [e["step"] for e in one["train"]] == [e["step"] for e in two["train"]] == list(range(1, 18))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one["train"], two["train"])) < TOLERANCE
    assert [e["step"] for e in one["eval"]] == [e["step"] for e in two["eval"]]
    assert max(abs(a["eval_loss"] - b["eval_loss"]) for a, b in zip(one["eval"], two["eval"])) < TOLERANCE
    a, b = (adapter_weights(one_and_two[n][0] / "adapter") for n in (1, 2))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE


def test_the_adapter_of_two_ranks_loads_with_peft(one_and_two):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from presets.materialize import resolve_model

    base_path = resolve_model(TINY)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = tokenizer("Tell me about Kubernetes.", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        before = base(**inputs).logits
        after = PeftModel.from_pretrained(base, one_and_two[2][0] / "adapter")(**inputs).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_two_ranks_resume_after_the_step_is_killed(tmp_path, distinct_data):
    """Killed (the whole process group, as when a pod dies) while rank 0 holds at step 3: checkpoint 2 is complete."""
    flag = tmp_path / "held"
    env = hook_env(tmp_path, what="hold", rank="0", step="3", flag=str(flag))
    cmd = tune_cmd(tmp_path, distinct_data, 2, "--max-steps", "6", "--save-steps", "2", "--skip-initial-eval")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 900  # a safety net against a hang, not a timing the test relies on
    try:
        while not flag.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "rank 0 never reached step 3"
            try:
                first.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert (tmp_path / "ckpt" / "checkpoint-2" / "kaiflow-complete").exists()
    assert not (tmp_path / "adapter").exists()
    second = subprocess.run(cmd, cwd=ROOT, env=hook_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    info = json.loads((tmp_path / "adapter" / "kaiflow.json").read_text())
    metrics = info["metrics"]
    assert (metrics["resumed_from_step"], metrics["steps"], metrics["processes"]) == (2, 6, 2)
    assert metrics["replicas_identical"] is True
    # four steps after the checkpoint, two sequences each, split between the ranks
    assert [r["examples"] for r in metrics["ranks"]] == [4, 4]
    history = json.loads((tmp_path / "adapter" / "loss.json").read_text())["train"]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5, 6]


def test_a_failing_rank_ends_the_step_with_its_exit_code_and_message(tmp_path, distinct_data):
    done = run_tune(tmp_path, distinct_data, 2, "--skip-initial-eval",
                    env=hook_env(tmp_path, what="fail", rank="1"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.rstrip().splitlines()[-1] == "error: rank 1 of 2: row 7 of the shard is corrupt (injected)"
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "outputs" / "train-loss").exists()


# -- no training --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_device", "accumulation", "ranks", "expected"),
    [
        (4, 1, 1, (4, 1, 4)),
        (2, 1, 2, (1, 1, 2)),  # the global batch stays 2: one sequence per rank
        (4, 2, 2, (4, 1, 8)),  # accumulation absorbs the ranks, the per-device batch stays
        (4, 4, 8, (2, 1, 16)),
        (8, 1, 4, (2, 1, 8)),
        (1, 6, 4, (1, 2, 8)),  # 6 is no multiple of 4: raised to 8
        (1, 1, 2, (1, 1, 2)),  # the CPU default: each rank needs a whole sequence
    ],
)
def test_split_batch_keeps_the_global_batch(per_device, accumulation, ranks, expected):
    batch, accum, global_batch, note = split_batch(per_device, accumulation, ranks)
    assert (batch, accum, global_batch) == expected
    assert batch * accum * ranks == global_batch and batch <= per_device
    assert (note is not None) == (global_batch != per_device * accumulation)


def test_the_first_rank_to_fail_names_the_step_failure():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failure(rank, code, path=None):
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(path or "/nonexistent"))

    def error_file(name, message, when):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kaiflow-test-{os.getpid()}-{name}.json"
        path.write_text(json.dumps({"message": message, "timestamp": int(when), "kaiflow_time": when}))
        return path

    later = error_file("later", "error: lost my peer", 200.5)
    first = error_file("first", "error: bad row", 200.1)
    try:
        picked = first_failure(ChildFailedError("tune", {0: failure(0, 1, later), 1: failure(1, 2, first), 2: failure(2, -9)}))
        assert (picked.rank, picked.exitcode, picked.message) == (1, 2, "bad row")
        killed = first_failure(ChildFailedError("tune", {3: failure(3, -9)}))
        assert (killed.rank, killed.exitcode) == (3, 137) and "SIGKILL" in killed.message
    finally:
        later.unlink()
        first.unlink()
