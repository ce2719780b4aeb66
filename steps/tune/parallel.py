"""Data-parallel tuning: one process per GPU, launched with torch's elastic launcher (torchrun).

``python -m steps.tune --nproc N`` (N > 1) does not train itself: it launches N copies of the
same command line with torch's elastic launcher — the code behind ``torchrun --standalone`` —
and each copy finds ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` in its environment and trains one
shard of every batch on its own device (``device_map={"": local_rank}``). transformers' Trainer
(through accelerate) sees the process group, wraps the model in DDP (gradients all-reduced) and
shards the batches. Why the launcher API rather than ``accelerate launch``: accelerate launch is
itself a wrapper that ends in the same ``elastic_launch`` call, but it also reads an accelerate
config file and exports ``ACCELERATE_MIXED_PRECISION`` and the like, which would compete with the
plan's precision; and the ``torchrun``/``accelerate launch`` command lines exit 1 whatever a
worker's exit code was, while the API hands back each rank's exit code, which the step's retry
policy needs (2 = bad input, never retried).

The global batch stays the plan's (``split_batch``): the plan's ``per_device_train_batch_size ×
gradient_accumulation_steps`` is what one process would take per optimizer step; N ranks take
that many sequences per step between them, so the number of optimizer steps, the learning-rate
schedule, ``save_steps`` and ``logging_steps`` are the same for any N.

Only rank 0 writes files that others read (``is_writer``): the run record, the adapter folder,
``loss.json``/``loss.png``, checkpoint markers, the step's output parameters and progress. The
trainer itself saves the model and optimizer from rank 0 and each rank's RNG state.

torch is imported inside the functions, like the rest of the package: importing ``steps.tune``
stays light (the pipelines' contract test parses its command line without the ML stack).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kaiflow.steps.tune")

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
LAUNCHER_PID_ENV = "KAIFLOW_TUNE_LAUNCHER_PID"


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a data-parallel run (one process: rank 0 of 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
            return cls()
        return cls(int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", os.environ["LOCAL_RANK"])),
                   int(os.environ["LOCAL_RANK"]))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def in_worker() -> bool:
    """True inside a process a launcher started (torchrun sets these)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def processes_wanted(requested: int | None, device: str) -> int:
    """``--nproc``, else one per visible CUDA device, else one."""
    if requested is not None:
        return requested
    if device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


# -- the global batch, divided among the ranks -------------------------------------------------


def split_batch(per_device: int, accumulation: int, world_size: int) -> tuple[int, int, int, str | None]:
    """(per-rank batch, per-rank accumulation, global batch, note) for ``world_size`` ranks.

    The plan's global batch G = per_device × accumulation (what one process takes per optimizer
    step) is kept: each rank takes G / N sequences per step, as the largest per-rank batch that
    does not exceed the plan's per-device batch (memory per device never grows) times the
    accumulation that makes up the rest. When N does not divide G, G is raised to the next
    multiple of N (a whole sequence per rank at least) and a note says so.
    """
    global_batch = per_device * accumulation
    if world_size <= 1:
        return per_device, accumulation, global_batch, None
    note = None
    if global_batch % world_size:
        raised = -(-global_batch // world_size) * world_size
        note = (f"global batch {global_batch} (per_device_train_batch_size {per_device} × gradient_accumulation_steps "
                f"{accumulation}) raised to {raised}: {world_size} processes need a whole number of sequences each")
        global_batch = raised
    share = global_batch // world_size
    batch = max(d for d in range(1, min(per_device, share) + 1) if share % d == 0)
    return batch, share // batch, global_batch, note


# -- the launcher --------------------------------------------------------------------------------


@dataclass
class RankFailure:
    rank: int
    exitcode: int
    message: str


def launch(argv: Sequence[str], processes: int, device: str) -> int:
    """Run ``python -m steps.tune argv`` as ``processes`` ranks; the step's exit code.

    A rank that fails ends the run (the launcher stops the others): its exit code becomes the
    step's and its ``error:`` line is repeated last, naming the rank.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone
        max_restarts=0,  # the pipeline retries the whole step, which resumes from the checkpoint
        monitor_interval=0.1,
    )
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N ranks share the cores; more threads than cores makes OpenMP spin (see docs/tuning.md)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    log.info("data-parallel tune: %d processes (%s), one per %s", processes,
             "gloo" if device == "cpu" else "nccl", "CPU share" if device == "cpu" else "GPU")
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        elastic_launch(config, sys.executable)("-m", "steps.tune", *argv)
    except ChildFailedError as exc:
        failure = first_failure(exc)
        print(f"error: rank {failure.rank} of {processes}: {failure.message}", file=sys.stderr)
        return failure.exitcode
    return 0


def first_failure(exc) -> RankFailure:
    """The rank that failed first with an ``error:`` of its own (the others were stopped, or lost their peer)."""

    def order(item):
        rank, failure = item
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        return ("kaiflow_time" not in data, data.get("kaiflow_time", failure.timestamp), rank)

    rank, failure = min(exc.failures.items(), key=order)
    code = failure.exitcode
    if code < 0:  # killed by a signal: the shell's convention
        code = 128 - code
    message = failure.message if isinstance(failure.message, str) else ""
    message = message.removeprefix("error: ") or (
        f"exited with {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}")
    return RankFailure(rank, code, message)


def record_failure(message: str) -> None:
    """Inside a rank: leave the ``error:`` line where the launcher reads it (torch elastic's error file)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        now = time.time()
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(now), "kaiflow_time": now}))


# -- inside a rank -----------------------------------------------------------------------------


def die_with_launcher() -> None:
    """A rank ends when its launcher does, however the launcher ended.

    torch's launcher starts each rank in a session of its own, so killing the launcher's process
    group (SIGKILL of ``kaiflow run``'s step, or a test's) would leave the ranks training (or
    waiting on each other) forever. In a pod the container's end takes them all anyway.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it ended before the line above
        os._exit(128 + int(signal.SIGKILL))



def init_process_group(ranks: Ranks, device: str) -> None:
    """Join the ranks (before the trainer, so the step can use barriers of its own)."""
    if not ranks.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ranks.local_rank))
    else:
        dist.init_process_group("gloo")


def quiet_other_ranks(ranks: Ranks) -> None:
    """Ranks other than 0 keep to their own lines and errors: no step-log file, no library warnings.

    Otherwise ``tune.log`` (``KAIFLOW_STEP_LOG``) would get N copies of every library warning.
    """
    if ranks.is_writer:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    warnings.simplefilter("ignore")
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "kernels", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a list of one without ranks)."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class SampleCounter:
    """Counts the training examples and tokens this rank trained on (a packed row holds several).

    It wraps the trainer's ``training_step``, so it counts what was trained on (not what the
    dataloader prefetched); the examples of a padding-free batch are where ``position_ids``
    restart at 0.
    """

    def __init__(self) -> None:
        self.examples = 0
        self.tokens = 0
        self.fingerprints: list[str] = []

    def add(self, inputs) -> None:
        ids = inputs["input_ids"].reshape(-1).tolist()
        positions = inputs.get("position_ids")
        if positions is not None:
            starts = [i for i, p in enumerate(positions.reshape(-1).tolist()) if p == 0] or [0]
        else:  # padded rows: one example per row
            width = inputs["input_ids"].shape[-1]
            starts = list(range(0, len(ids), width))
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None and positions is None else len(ids)
        for begin, end in zip(starts, [*starts[1:], len(ids)]):
            self.fingerprints.append(hashlib.sha1(repr(ids[begin:end]).encode()).hexdigest()[:16])
        self.examples += len(starts)
        self.tokens += real

    def summary(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "examples": self.examples, "tokens": self.tokens}


def count_training_samples(trainer, counter: SampleCounter) -> None:
    """Count each training batch this rank trains on (evaluation batches are not counted)."""
    step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        counter.add(inputs)
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
