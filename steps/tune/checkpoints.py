"""Resume: complete checkpoints only, and a record of what the run in a checkpoint dir was.

Checkpoints go to ``--checkpoint-dir`` every ``save_steps``. A checkpoint counts only once a
marker file is written after the trainer's save returned (``CheckpointMarker``), so a kill during
a save leaves a directory that is ignored (and removed) on the next start. A rerun with the same
arguments continues from the newest complete checkpoint, with optimizer, scheduler, RNG and data
order restored by the trainer. ``kaiflow-run.json`` records what the run was (preset, method,
dataset digest, settings); a rerun that differs is refused rather than mixing two trainings —
except ``--max-steps`` (and the save/logging cadence), which may change to train further.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from stepkit.common import StepError
from steps.tune.config import TuneConfig
from steps.tune.plan import RESUMABLE_CHANGES, Plan

log = logging.getLogger("kaiflow.steps.tune")

RUN_FILE = "kaiflow-run.json"
COMPLETE_MARKER = "kaiflow-complete"


def complete_checkpoints(checkpoint_dir: Path, *, remove_incomplete: bool = True) -> list[Path]:
    """Checkpoints with their marker, oldest first; the others are removed (by rank 0 only)."""
    found = []
    for path in checkpoint_dir.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            if (path / COMPLETE_MARKER).exists():
                found.append(path)
            elif remove_incomplete:
                log.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", path)
                shutil.rmtree(path, ignore_errors=True)
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def tokens_at(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))


def run_identity(cfg: TuneConfig, plan: Plan, digest: str) -> dict[str, Any]:
    training = {k: v for k, v in plan.record["training"].items() if k not in RESUMABLE_CHANGES}
    settings = {"lora": plan.record["lora"], "quantization": plan.record["quantization"], "training": training,
                "dtype": plan.dtype}
    # The number of processes is not part of the run: the global batch is (a resumed run may use
    # another N as long as each rank's share stays whole, see steps.tune.parallel.split_batch).
    planned = int(training.get("per_device_train_batch_size", 1)) * int(training.get("gradient_accumulation_steps", 1))
    global_batch = (plan.record.get("parallel") or {}).get("global_batch", planned)
    if global_batch != planned:
        settings["global_batch"] = global_batch
    return {
        "preset": cfg.preset,
        "method": cfg.method,
        "dataset_digest": digest,
        "settings_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
    }


def check_run_record(checkpoint_dir: Path, identity: dict[str, Any], has_checkpoints: bool) -> dict[str, Any]:
    path = checkpoint_dir / RUN_FILE
    if path.exists():
        record = json.loads(path.read_text())
        if has_checkpoints:
            for key, value in identity.items():
                if record.get("identity", {}).get(key) != value:
                    raise StepError(
                        f"--checkpoint-dir {checkpoint_dir} holds checkpoints of another run ({key} differs: "
                        f"{record.get('identity', {}).get(key)!r} there, {value!r} now); use a fresh directory"
                    )
            return record
    record = {"identity": identity}
    write_run_record(checkpoint_dir, record)
    return record


def write_run_record(checkpoint_dir: Path, record: dict[str, Any]) -> None:
    (checkpoint_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def dataset_digest(cfg: TuneConfig) -> str:
    if cfg.dataset_digest:
        return cfg.dataset_digest
    summary = cfg.dataset_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["digest"]
    h = hashlib.sha256()
    for name in ("train.parquet", "eval.parquet"):
        if (cfg.dataset_dir / name).exists():
            h.update((cfg.dataset_dir / name).read_bytes())
    return "sha256:" + h.hexdigest()
