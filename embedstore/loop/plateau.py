"""The plateau rule: when labeling more stops paying, fine-tuning may.

From the eval history of a version (one run per label count, the latest run kept when several), the
best head's accuracy gained less than `margin` (default 0.01) over the last `window` (default 2) label
additions: acc[-1] - acc[-1 - window] < margin. Fewer label counts than window + 1: no plateau yet. A
run with fewer labels than the one before (labels removed) restarts the curve.
"""

from __future__ import annotations

from typing import Sequence

from embedstore.errors import InvalidArgumentError
from embedstore.results import EvalRun, PlateauResult

PLATEAU_MARGIN = 0.01
PLATEAU_WINDOW = 2


def plateau_rule(history: Sequence[EvalRun], margin: float = PLATEAU_MARGIN, window: int = PLATEAU_WINDOW) -> PlateauResult:
    """Apply the plateau rule to eval runs (oldest first)."""
    if margin < 0 or window < 1:
        raise InvalidArgumentError(f"plateau rule needs margin >= 0 and window >= 1; got margin={margin}, window={window}")
    points: list[dict] = []
    for run in history:
        acc, n = run.best_accuracy, run.n_labels
        if acc is None or n is None:
            continue
        p = {"n_labels": int(n), "accuracy": float(acc)}
        if points and p["n_labels"] == points[-1]["n_labels"]:
            points[-1] = p  # the latest run at this label count
        elif points and p["n_labels"] < points[-1]["n_labels"]:
            points = [p]  # labels were removed: the learning curve starts again
        else:
            points.append(p)
    if len(points) < window + 1:
        reason = (
            f"eval runs at {len(points)} label count(s); the rule needs {window + 1}: "
            "label more images and run `embedstore eval` after each batch"
        )
        return PlateauResult(False, reason, None, margin, window, points)
    a, b = points[-1 - window], points[-1]
    gain = b["accuracy"] - a["accuracy"]
    plateau = gain < margin
    verb = "gained only" if plateau else "gained"
    reason = (
        f"best-head accuracy {verb} {gain:+.3f} ({a['accuracy']:.3f} -> {b['accuracy']:.3f}) over the last "
        f"{window} label additions ({a['n_labels']} -> {b['n_labels']} labels); margin {margin}"
    )
    return PlateauResult(plateau, reason, round(gain, 4), margin, window, points)
