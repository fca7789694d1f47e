"""What classify says about its head, shared by the local and the Ray engine: which head predicts and why."""

from __future__ import annotations

MAX_UNLABELED = 5_000  # unlabeled vectors a head sees while fitting (transductive heads, centering)
NO_LABELS_HINT = "label a few images per class first: embedstore label STORE --class NAME IMAGES..."


def describe_choice(h, requested: str, n_labels: int) -> str:
    """One line on which head predicts and why (auto: its cross-validated choice)."""
    chosen = head_label(h, requested)
    if requested != "auto":
        return f"head {chosen}, as asked"
    scores = getattr(h, "cv_scores", None) or {}
    if not scores:
        why = getattr(h, "note", "") or (f"some class has a single label, too few to cross-validate a choice "
                                         f"({n_labels} labels); label 2+ images per class to let auto choose")
        return f"auto used {chosen}: {why}"
    best = scores.get(chosen.replace(" + ", "+")) or {}
    acc = best.get("accuracy")
    note = getattr(h, "note", "")
    if getattr(h, "default_kept", False):
        return f"auto used its default {chosen} ({len(scores)} candidates cross-validated on {n_labels} labels): {note}"
    return (f"auto chose {chosen}: best cross-validated accuracy"
            + (f" {acc:.3f}" if acc is not None else "") + f" of {len(scores)} candidates on {n_labels} labels"
            + (f" ({note})" if note else ""))


def head_label(h, requested: str) -> str:
    """The name of what actually predicts: the head's own `chosen` (auto) or its name."""
    chosen = getattr(h, "chosen", None) or getattr(h, "chosen_name", None)
    if chosen:
        return str(chosen)
    return getattr(h, "name", requested) or requested
