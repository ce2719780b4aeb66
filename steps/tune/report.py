"""What a tune leaves beside the adapter: ``loss.json`` and the ``loss.png`` curve.

``loss.json`` holds the training loss at every logging step (with learning rate and epoch), the
held-out evaluations, and the run's metrics, so the curve can be re-plotted or compared later.
The PNG is drawn with matplotlib's Agg backend (no display needed in a pod): the training loss at
every logged step, faint, under its smoothed curve, and the held-out loss as markers at the steps
where it was measured (before training, about ten times during it, at the end), nothing joined.
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
    plot_loss(output_dir / "loss.png", losses, metrics, evaluations)


def _jsonable(value: Any) -> Any:
    return str(value)


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def smoothing_weight(points: int) -> float:
    """None for a handful of points; else TensorBoard's default 0.6, more for long runs (about a tenth of
    the run in the average), at most 0.95."""
    if points < 8:
        return 0.0
    return max(0.6, min(0.95, 1 - 10 / points))


def plot_loss(path: Path, losses: list[dict[str, Any]], metrics: dict[str, Any],
              evals: list[dict[str, Any]] | None = None) -> None:
    """Training loss as measured (faint) and smoothed (solid), held-out loss as markers where measured.

    Nothing is drawn between two held-out measurements: a line would suggest values nobody measured.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if losses:
        steps = [e["step"] for e in losses]
        values = [e["loss"] for e in losses]
        weight = smoothing_weight(len(values))
        ax.plot(steps, values, color="tab:blue", alpha=0.3 if weight else 1.0, linewidth=1, marker=".",
                markersize=3, label="training loss (each logged step)")
        if weight:
            ax.plot(steps, smoothed(values, weight), color="tab:blue", linewidth=2,
                    label=f"training loss, smoothed (EMA {weight:.2f})")
    measured = [e for e in (evals or []) if e.get("step") is not None and _finite(e.get("eval_loss"))]
    if measured:
        ax.plot([e["step"] for e in measured], [e["eval_loss"] for e in measured], linestyle="none", marker="o",
                color="tab:orange", label="held-out loss (where measured)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per token)")
    ax.set_title(f"{metrics.get('tokens_per_s', 0):.0f} tokens/s, {metrics.get('steps') or 0} steps")
    ax.grid(alpha=0.3)
    if losses or measured:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
