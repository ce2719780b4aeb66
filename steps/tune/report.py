"""What a tune leaves beside the adapter: ``loss.json`` and the ``loss.png`` curve.

``loss.json`` holds the training loss at every logging step (with learning rate and epoch), the
held-out evaluations, and the run's metrics, so the curve can be re-plotted or compared later.
The PNG is drawn with matplotlib's Agg backend (no display needed in a pod).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_reports(output_dir: Path, losses: list[dict[str, Any]], evals: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    evaluations = [{"step": e.get("step"), "eval_loss": e["eval_loss"]} for e in evals]
    (output_dir / "loss.json").write_text(
        json.dumps({"train": losses, "eval": evaluations, "metrics": metrics}, indent=2, default=_jsonable) + "\n"
    )
    plot_loss(output_dir / "loss.png", losses, metrics)


def _jsonable(value: Any) -> Any:
    return str(value)


def plot_loss(path: Path, losses: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if losses:
        ax.plot([e["step"] for e in losses], [e["loss"] for e in losses], marker=".", label="training loss")
    steps = metrics.get("steps") or 0
    before, after = metrics.get("eval_loss_initial"), metrics.get("eval_loss")
    if before is not None and not math.isnan(before) and after is not None and not math.isnan(after):
        ax.plot([0, steps], [before, after], marker="o", linestyle="--", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{metrics.get('tokens_per_s', 0):.0f} tokens/s, {steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
