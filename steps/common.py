"""What every step shares: output parameters, Argo progress, logging and error exits.

A step is a plain CLI (`python -m steps.<name> ...`). It knows nothing of Argo: it writes each
output parameter as a file named after the output in ``--outputs`` (Argo reads them with
``valueFrom.path``; the local runner reads the same files), reports progress to the file named by
``ARGO_PROGRESS_FILE`` when that variable is set, and fails with exit code 2 and one clear line
for bad input (``StepError``) so the failing task's log tail says what went wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("kaiflow.steps")

DEFAULT_OUTPUTS_DIR = "outputs"


class StepError(Exception):
    """Bad input or a failed precondition: reported as one line, exit code 2, no traceback."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--outputs",
        default=os.environ.get("KAIFLOW_OUTPUTS", DEFAULT_OUTPUTS_DIR),
        help="directory where output parameters are written, one file per output name",
    )


def write_output(outputs_dir: str | os.PathLike[str], name: str, value: Any) -> Path:
    """Write one output parameter; dicts and lists are written as JSON, the rest as text."""
    directory = Path(outputs_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_output(outputs_dir: str | os.PathLike[str], name: str) -> str:
    return (Path(outputs_dir) / name).read_text()


def report_progress(done: int, total: int) -> None:
    """Tell Argo how far a long step is (`done/total`, shown in the UI); no-op outside Argo."""
    progress_file = os.environ.get("ARGO_PROGRESS_FILE")
    if not progress_file or total <= 0:
        return
    try:
        Path(progress_file).write_text(f"{min(done, total)}/{total}\n")
    except OSError as exc:  # progress is advisory: never fail a step for it
        log.debug("cannot write progress file %s: %s", progress_file, exc)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_step(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a step's main with the shared error policy; returns the process exit code."""
    setup_logging(verbose=bool(os.environ.get("KAIFLOW_DEBUG")))
    try:
        return int(main(argv) or 0)
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
