"""Decide whether a freshly tuned adapter replaces the one being served (`python -m steps.eval_gate`).

Scheduled retuning runs because the data at the dataset URL changed, so the loss recorded on the
serving adapter's manifest (``sh.kaito.kaiflow.eval-loss``) was measured on *another* held-out
split than the candidate's. With ``--dataset-dir`` (the fetch_dataset output the candidate trained
on) the gate compares like with like: it pulls the serving adapter by the digest ``--current-image``
resolves to (``steps.pull_adapters``), loads the base model once, and scores both adapters on the
candidate's ``eval.parquet`` with the tune's own evaluation (``steps.tune.evaluate``). The
candidate is promoted when its loss on those rows is no worse than the serving adapter's.

The manifest annotation remains the fallback, used when the serving adapter cannot be scored on
the new rows: no ``--dataset-dir``, its base model or preset differs from the candidate's, the pull
fails, or the evaluation fails (e.g. an adapter that does not fit the base). Which comparison
decided is the output ``gate-basis``:

* ``same-rows``          both adapters scored on the candidate's held-out rows
* ``annotation``         candidate's recorded loss vs the annotation on the serving manifest
* ``no-serving-adapter`` nothing serves yet (404 on tag/repository): promote=true (first tuning)
* ``no-held-out-rows``   the candidate has no held-out loss (NaN): promote=false

Outcomes (outputs ``promote``, ``current-eval-loss``, ``candidate-eval-loss``, ``gate-basis``):

* candidate loss <= current loss             -> promote=true
* candidate loss >  current loss             -> promote=false
* a current adapter without the annotation   -> promote=false, current-eval-loss=none: an image
  pushed by hand or by another tool is not replaced automatically (delete the tag or push it with
  the annotation to let the schedule take over); logged as a warning; nothing is pulled
* 401/403 on the manifest, bad kaiflow.json, --dataset-dir without eval.parquet -> the step fails
  (exit 2), nothing is promoted
* registry unreachable or 5xx on the manifest after retries -> exit 1 (the pipeline retries it)

The same-rows comparison costs one base-model load and two evaluation passes over the held-out
rows (see docs/user-guide/adapters-oci.md for the measured cost on SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepkit.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    run_step,
    write_output,
)
from stepkit.oci import (
    ADAPTER_ANNOTATION_PREFIX,
    EVAL_LOSS_ANNOTATION,
    ImageRef,
    RegistryClient,
    RegistryNotFoundError,
    RegistryOptions,
    parse_image,
)
from steps.pull_adapters import PullConfig, pull_adapters
from steps.tune.evaluate import evaluate_adapters

log = logging.getLogger("kaiflow.steps.eval_gate")

SAME_ROWS = "same-rows"
ANNOTATION = "annotation"
NO_SERVING_ADAPTER = "no-serving-adapter"
NO_HELD_OUT_ROWS = "no-held-out-rows"


@dataclass
class GateConfig:
    candidate_dir: str = field(metadata={"help": "the tune step's output directory (reads kaiflow.json)"})
    current_image: str = field(metadata={"help": "reference of the adapter now serving, e.g. registry/repo:latest"})
    dataset_dir: str | None = field(default=None, metadata={
        "help": "the candidate's fetch_dataset output: score the serving adapter and the candidate on its "
                "eval.parquet (without it: compare with the serving manifest's eval-loss annotation)"})
    device: str = field(default="auto", metadata={"help": "where the same-rows evaluation runs: auto, cpu or cuda",
                                                   "choices": ["auto", "cpu", "cuda"]})


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_eval_loss: float
    current_eval_loss: float | None
    reason: str
    basis: str = ANNOTATION
    details: dict[str, Any] = field(default_factory=dict)


def read_candidate(candidate_dir: Path) -> dict[str, Any]:
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
    return document


def candidate_eval_loss(candidate_dir: Path) -> float:
    return float(read_candidate(candidate_dir)["metrics"]["eval_loss"])


def parse_loss(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def decide(config: GateConfig, options: RegistryOptions | None = None) -> GateDecision:
    options = options or RegistryOptions()
    candidate_dir = Path(config.candidate_dir)
    candidate_info = read_candidate(candidate_dir)
    candidate = float(candidate_info["metrics"]["eval_loss"])
    image = parse_image(config.current_image, "--current-image")
    if not image.tag and not image.digest:
        image = image.with_tag("latest")
    if config.dataset_dir and not (Path(config.dataset_dir) / "eval.parquet").is_file():
        raise StepError(f"--dataset-dir {config.dataset_dir}: no eval.parquet (pass the fetch_dataset output "
                        "the candidate trained on)")
    if math.isnan(candidate):
        return GateDecision(False, candidate, None, "the candidate's eval loss is NaN (no held-out rows)",
                            NO_HELD_OUT_ROWS)
    try:
        manifest, digest, _ = RegistryClient(image, options).fetch_manifest()
    except RegistryNotFoundError as exc:
        reason = f"no current adapter at {image} ({exc}): promoting the first candidate"
        log.info(reason)
        return GateDecision(True, candidate, None, reason, NO_SERVING_ADAPTER)
    annotations = manifest.get("annotations") or {}
    recorded = parse_loss(annotations.get(EVAL_LOSS_ANNOTATION))
    if recorded is None:
        reason = (f"{image}@{digest} has no numeric {EVAL_LOSS_ANNOTATION} annotation: keeping it (delete the "
                  "tag or push it with the annotation to let tuning replace it)")
        log.warning(reason)
        return GateDecision(False, candidate, None, reason, ANNOTATION)
    pinned = image.with_digest(digest)
    fallback = "no --dataset-dir"
    if config.dataset_dir:
        measured, fallback = same_rows(config, candidate_info, pinned, annotations, options)
        if measured is not None:
            new, current = measured["losses"]["candidate"], measured["losses"]["serving"]
            promote = new <= current
            reason = (f"on the same {measured['rows']} held-out rows of {config.dataset_dir}: candidate {new:.6g} "
                      f"{'<=' if promote else '>'} serving {current:.6g} ({pinned}; its manifest records "
                      f"{recorded:.6g} on its own split, the candidate's run {candidate:.6g})")
            log.info("%s: %s", "promote" if promote else "keep current", reason)
            return GateDecision(promote, new, current, reason, SAME_ROWS, measured)
        log.warning("comparing with the manifest annotation instead of the same rows: %s", fallback)
    promote = candidate <= recorded
    reason = (f"candidate eval loss {candidate:.6g} {'<=' if promote else '>'} current {recorded:.6g} "
              f"({pinned}, recorded on its own held-out split: {fallback})")
    log.info("%s: %s", "promote" if promote else "keep current", reason)
    return GateDecision(promote, candidate, recorded, reason, ANNOTATION)


def same_rows(config: GateConfig, candidate_info: dict[str, Any], pinned: ImageRef, annotations: dict[str, str],
              options: RegistryOptions) -> tuple[dict[str, Any] | None, str]:
    """Both adapters scored on the candidate's held-out rows, or (None, why that was not possible)."""

    mismatch = base_mismatch(candidate_info, annotations)
    if mismatch:
        return None, mismatch
    with tempfile.TemporaryDirectory(prefix="kaiflow-gate-") as scratch:
        try:
            pulled = pull_adapters(PullConfig(adapter=[f"serving={pinned}"], dest=scratch), options)
        except StepError as exc:  # RetryableError included: the annotation still gives a decision
            return None, f"cannot pull the serving adapter {pinned}: {exc}"
        serving_dir = Path(pulled[0].path)
        mismatch = base_mismatch(candidate_info, _pulled_metadata(serving_dir))
        if mismatch:
            return None, mismatch

        try:
            measured = evaluate_adapters(
                candidate_info["preset"], candidate_info.get("method", "lora"), Path(config.dataset_dir),
                {"candidate": Path(config.candidate_dir), "serving": serving_dir},
                base_model=candidate_info.get("base_model"), training=candidate_info.get("training"),
                device=config.device,
            )
        except (StepError, OSError, RuntimeError, ValueError, KeyError) as exc:
            # e.g. adapter weights whose shapes or module names do not fit the base model
            return None, f"cannot evaluate the serving adapter {pinned} on the new rows: {exc}"
    return measured, ""


def base_mismatch(candidate_info: dict[str, Any], serving: dict[str, str]) -> str:
    """Why the two adapters do not share a base model, or '' when they do (as far as recorded)."""
    for key in ("preset", "base-model"):
        ours = candidate_info.get(key.replace("-", "_"))
        theirs = serving.get(ADAPTER_ANNOTATION_PREFIX + key)
        if ours is not None and theirs is not None and str(ours) != str(theirs):
            return f"the serving adapter's {key} is {theirs!r}, the candidate's {ours!r}"
    return ""


def _pulled_metadata(adapter_dir: Path) -> dict[str, str]:
    """The pulled adapter's kaiflow.json in annotation form (manifests pushed with fewer annotations)."""
    try:
        document = json.loads((adapter_dir / "kaiflow.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {ADAPTER_ANNOTATION_PREFIX + "preset": document.get("preset"),
            ADAPTER_ANNOTATION_PREFIX + "base-model": document.get("base_model")}


def _loss_text(value: float | None) -> str:
    return "none" if value is None else repr(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Promote the candidate adapter if its held-out loss is no worse than the serving one's.")
    add_dataclass_arguments(parser, GateConfig)
    add_dataclass_arguments(parser, RegistryOptions)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    decision = decide(dataclass_from_args(GateConfig, args), dataclass_from_args(RegistryOptions, args))
    write_output(args.outputs, "promote", "true" if decision.promote else "false")
    write_output(args.outputs, "current-eval-loss", _loss_text(decision.current_eval_loss))
    write_output(args.outputs, "candidate-eval-loss", _loss_text(decision.candidate_eval_loss))
    write_output(args.outputs, "gate-basis", decision.basis)
    print(f"promote={'true' if decision.promote else 'false'} ({decision.basis}): {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
