"""The activation decision: is the fine-tuned version better on labels its backbone never saw?

Folds of the labels (per class, seeded, stratified):
    decision    a fraction `decide` (default 25%) kept out of training AND of every choice made while
                training (epochs, WiSE alpha): only the decision looks at them
    selection   part of the rest (`holdout`), for early stopping / WiSE alpha; never trained on
    train       what the backbone trains on
Heads (centroid, knn, linear, propagate) are fit on train + selection (the labels the backbone saw, as
classify would fit them) with each version's vectors, and scored on the decision fold. The compared
quantity is best-head accuracy, new minus old, on the same images (paired). Its uncertainty: a paired
bootstrap over the decision images (the choice of the best head is redone in every resample, so the
optimism of picking the best of four heads is inside the interval). Activation needs the lower end of the
80% interval (the 10th percentile) to exceed the margin (default 0): a fine-tune that only helps the
labels it trained on, or helps too few decision images to be told from noise, is not activated. And what
`classify` gives by default, head auto (fit as classify fits it: never scored on images a backbone trained
on), must not be worse on those images: a backbone whose best head improves while auto loses is kept.
With fewer than `min_decide` (default 20) decision labels there is no decision: nothing is trained.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from embedstore.labels.heads import HEADS, make_head

DECISION_HEADS = ("centroid", "knn", "linear", "propagate")  # heads that need no text tower: the best-head quantity
DEFAULT_HEAD = "auto"  # what classify uses unless told otherwise: must not get worse
BOOTSTRAP = 2000
LEVEL = 0.8  # two-sided interval reported; its lower end is the one-sided 90% bound the rule uses


def labels_needed(n_classes: int, frac: float, min_decide: int) -> int:
    """Labels per class that give at least `min_decide` decision labels (round(frac * n) per class)."""
    per = max(1, math.ceil(min_decide / max(1, n_classes)))  # decision labels wanted per class
    n = per
    while int(round(frac * n)) < per:
        n += 1
    return n


def head_correctness(X_fit: np.ndarray, y_fit: Sequence[str], X_eval: np.ndarray, y_eval: Sequence[str],
                     score_mask: np.ndarray | None = None) -> dict:
    """{head: bool array, one per evaluated image}: each decision head and auto fit on (X_fit, y_fit);
    score_mask: which fit labels auto may score its candidates on (False: the backbone trained on it)."""
    out = {}
    truth = np.asarray(list(y_eval), dtype=object)
    for name in (*DECISION_HEADS, DEFAULT_HEAD):
        if name in HEADS:
            h = make_head(name)
            if name == DEFAULT_HEAD:
                h.score_mask = score_mask
            h = h.fit(X_fit, list(y_fit), unlabeled=X_eval)
            out[name] = np.asarray(h.predict(X_eval), dtype=object) == truth
    return out


def paired_comparison(old: dict, new: dict, margin: float = 0.0, seed: int = 0, n_boot: int = BOOTSTRAP) -> dict:
    """Best-head accuracy of `new` minus `old` on the same images ({head: correctness array} each), with a
    paired bootstrap interval; better = the interval's lower end exceeds `margin` and (when both have it)
    the default head auto is not worse."""
    default = None
    if DEFAULT_HEAD in old and DEFAULT_HEAD in new:
        default = (np.asarray(old[DEFAULT_HEAD], np.float64), np.asarray(new[DEFAULT_HEAD], np.float64))
    heads = [h for h in old if h in new and h != DEFAULT_HEAD]
    O = np.stack([np.asarray(old[h], np.float64) for h in heads])
    N = np.stack([np.asarray(new[h], np.float64) for h in heads])
    n = O.shape[1]
    acc_o, acc_n = O.mean(1), N.mean(1)
    est = float(acc_n.max() - acc_o.max())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    d = N[:, idx].mean(-1).max(0) - O[:, idx].mean(-1).max(0)  # (n_boot,)
    lo, hi = np.quantile(d, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    auto = None
    if default is not None:
        dd = default[1][idx].mean(-1) - default[0][idx].mean(-1)
        a_lo, a_hi = np.quantile(dd, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        auto = {"old": round(float(default[0].mean()), 4), "new": round(float(default[1].mean()), 4),
                "estimate": round(float(default[1].mean() - default[0].mean()), 4),
                "low": round(float(a_lo), 4), "high": round(float(a_hi), 4)}
    return {
        "estimate": round(est, 4), "low": round(float(lo), 4), "high": round(float(hi), 4),
        "se": round(float(d.std()), 4), "level": LEVEL, "margin": margin, "n": n,
        "old": {"accuracy": round(float(acc_o.max()), 4), "head": heads[int(acc_o.argmax())],
                "heads": {h: round(float(a), 4) for h, a in zip(heads, acc_o)}},
        "new": {"accuracy": round(float(acc_n.max()), 4), "head": heads[int(acc_n.argmax())],
                "heads": {h: round(float(a), 4) for h, a in zip(heads, acc_n)}},
        DEFAULT_HEAD: auto,
        "better": bool(lo > margin and (auto is None or auto["estimate"] >= 0)),
    }


def decide(comparison: dict | None, forgetting: dict | None, max_forgetting: float, n_decide: int,
           min_decide: int) -> tuple[bool, str]:
    """(activate, why) from the paired comparison, the forgetting measure and the decision fold's size."""
    if comparison is None or n_decide < min_decide:
        return False, (f"too few labels to decide: {n_decide} decision labels, at least {min_decide} needed "
                       "(label more images per class)")
    c = comparison
    span = f"new - old = {c['estimate']:+.3f} (80% interval {c['low']:+.3f} .. {c['high']:+.3f}, n={c['n']})"
    a = c.get(DEFAULT_HEAD)
    if c["low"] <= c["margin"]:
        return False, f"not better on labels it never saw: {span}; its lower end must exceed the margin {c['margin']:+.3f}"
    if a and a["estimate"] < 0:
        return False, (f"the best head improves ({span}) but {DEFAULT_HEAD}, what classify uses, gets worse on labels it "
                       f"never saw: {a['old']:.3f} -> {a['new']:.3f} ({a['estimate']:+.3f})")
    if forgetting and forgetting.get("drop") is not None and forgetting["drop"] > max_forgetting:
        return False, (f"better on the labels ({span}) but search on the other images degrades: near-duplicate "
                       f"recall@{forgetting['k']} {forgetting['recall_old']:.3f} -> {forgetting['recall_new']:.3f} "
                       f"(drop {forgetting['drop']:.3f} > {max_forgetting})")
    tail = f"; {DEFAULT_HEAD} {a['old']:.3f} -> {a['new']:.3f}" if a else ""
    return True, f"better on labels it never saw: {span} > margin {c['margin']:+.3f}{tail}"
