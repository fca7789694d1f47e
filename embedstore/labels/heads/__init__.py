"""Few-shot heads over L2-normalised vectors, behind one interface (see base.Head).

    from embedstore.labels.heads import make_head, HEADS
    head = make_head("knn").fit(X, y)           # y: class names
    P = head.predict_proba(Q)                    # (M, C) over head.classes
    labels = abstain(P, 0.5, head.classes)       # None where below threshold
"""

from __future__ import annotations

from embedstore.errors import InvalidArgumentError
from embedstore.labels.heads.base import HEADS, Head, abstain, cl2n, l2n, load_head
from embedstore.labels.heads import knn, centroid  # noqa: F401  (registers the heads)

for _mod in ("linear", "zeroshot", "fused", "propagate", "auto"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ImportError as _e:  # a head still being written must not break the others
        if f"{__name__}.{_mod}" not in str(_e):
            raise


def make_head(name: str, **kw) -> Head:
    """A new, unfitted head by name (knn, centroid, linear, zeroshot, fused, propagate, auto)."""
    if name not in HEADS:
        raise InvalidArgumentError(f"unknown head '{name}'; choose one of: {', '.join(HEADS)}")
    return HEADS[name](**kw)


__all__ = ["HEADS", "Head", "make_head", "load_head", "abstain", "l2n", "cl2n"]
