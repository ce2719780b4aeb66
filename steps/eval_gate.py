"""Decide whether a freshly tuned adapter replaces the one being served (`python -m steps.eval_gate`).

The candidate's held-out loss is ``metrics.eval_loss`` in ``<candidate-dir>/kaiflow.json`` (the tune
step writes it). The serving adapter's is the ``sh.kaito.kaiflow.eval-loss`` annotation on the
manifest of ``--current-image`` (normally the ``latest`` tag, moved only by a promoted push).
Only the manifest is fetched, never the blobs.

Outcomes (outputs ``promote`` and ``current-eval-loss``):

* candidate loss <= current loss             -> promote=true
* candidate loss >  current loss             -> promote=false
* no current adapter (404 on tag/repository) -> promote=true, current-eval-loss=none (first tuning)
* a current adapter without the annotation   -> promote=false, current-eval-loss=none: an image
  pushed by hand or by another tool is not replaced automatically (delete the tag or push it with
  the annotation to let the schedule take over); logged as a warning
* 401/403, bad kaiflow.json                 -> the step fails (exit 2), nothing is promoted
* registry unreachable or 5xx after retries -> the step fails with exit 1 (the pipeline retries it),
  nothing is promoted

The comparison is only meaningful while the held-out split stays comparable between runs; the
fetch_dataset step draws it with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steps.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    run_step,
    write_output,
)
from steps.oci import (
    RegistryClient,
    RegistryNotFoundError,
    RegistryOptions,
    parse_image,
)
from steps.push_adapter import EVAL_LOSS_ANNOTATION

log = logging.getLogger("kaiflow.steps.eval_gate")


@dataclass
class GateConfig:
    candidate_dir: str = field(metadata={"help": "the tune step's output directory (reads kaiflow.json)"})
    current_image: str = field(metadata={"help": "reference of the adapter now serving, e.g. registry/repo:latest"})


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_eval_loss: float
    current_eval_loss: float | None
    reason: str


def candidate_eval_loss(candidate_dir: Path) -> float:
    path = candidate_dir / "kaiflow.json"
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StepError(f"--candidate-dir {candidate_dir}: kaiflow.json is missing (run the tune step first)") from None
    except (ValueError, UnicodeDecodeError):
        raise StepError(f"--candidate-dir: {path} is not valid JSON") from None
    metrics = document.get("metrics") if isinstance(document, dict) else None
    value = metrics.get("eval_loss") if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StepError(f"--candidate-dir: {path} has no number at metrics.eval_loss (found {value!r})")
    return float(value)


def parse_loss(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def decide(config: GateConfig, options: RegistryOptions | None = None) -> GateDecision:
    candidate = candidate_eval_loss(Path(config.candidate_dir))
    image = parse_image(config.current_image, "--current-image")
    if not image.tag and not image.digest:
        image = image.with_tag("latest")
    if math.isnan(candidate):
        return GateDecision(False, candidate, None, "the candidate's eval loss is NaN")
    try:
        manifest, digest, _ = RegistryClient(image, options or RegistryOptions()).fetch_manifest()
    except RegistryNotFoundError as exc:
        reason = f"no current adapter at {image} ({exc}): promoting the first candidate"
        log.info(reason)
        return GateDecision(True, candidate, None, reason)
    current = parse_loss((manifest.get("annotations") or {}).get(EVAL_LOSS_ANNOTATION))
    if current is None:
        reason = (f"{image}@{digest} has no numeric {EVAL_LOSS_ANNOTATION} annotation: keeping it (delete the "
                  "tag or push it with the annotation to let tuning replace it)")
        log.warning(reason)
        return GateDecision(False, candidate, None, reason)
    promote = candidate <= current
    reason = f"candidate eval loss {candidate:.6g} {'<=' if promote else '>'} current {current:.6g} ({image}@{digest})"
    log.info("%s: %s", "promote" if promote else "keep current", reason)
    return GateDecision(promote, candidate, current, reason)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Promote the candidate adapter if its held-out loss is no worse than the serving one's.")
    add_dataclass_arguments(parser, GateConfig)
    add_dataclass_arguments(parser, RegistryOptions)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    decision = decide(dataclass_from_args(GateConfig, args), dataclass_from_args(RegistryOptions, args))
    write_output(args.outputs, "promote", "true" if decision.promote else "false")
    write_output(args.outputs, "current-eval-loss",
                 "none" if decision.current_eval_loss is None else repr(decision.current_eval_loss))
    print(f"promote={'true' if decision.promote else 'false'}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
