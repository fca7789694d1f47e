"""Temperature scaling (Guo et al. 2017) fitted on held-out folds of the labels.

One scalar T per head: probabilities are softmax(logits / T), with T minimising the negative
log-likelihood of out-of-fold predictions. It changes confidence, never the argmax, so `--threshold`
means roughly "at least this likely to be right" for every head.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize_scalar

from embedstore.labels.heads.vectors import encode_labels


def nll(logits: np.ndarray, y: np.ndarray, T: float = 1.0, weights: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of softmax(logits / T); `weights` make it a weighted mean."""
    Z = logits.astype(np.float64) / T
    Z = Z - Z.max(1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(1, keepdims=True))
    return float(-np.average(logp[np.arange(len(y)), y], weights=weights))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds=(0.02, 50.0), weights: np.ndarray | None = None) -> float:
    """The T in `bounds` minimising NLL of softmax(logits / T) for int labels y (each weighted, if given)."""
    if len(y) == 0:
        return 1.0
    r = minimize_scalar(lambda t: nll(logits, y, float(np.exp(t)), weights), bounds=np.log(bounds), method="bounded")
    return float(np.exp(r.x))


def make_folds(y, n_splits: int = 5, seed: int = 0):
    """Stratified folds over the labels, or None when some class has a single example.

    The number of folds is not capped by the smallest class (a class with fewer labels than folds is held out
    in only some of them, and every training part keeps at least one of its labels): labels chosen by `suggest`
    are uneven, and capping at the smallest class (2 labels -> 2 folds) trained each out-of-fold head on half the
    labels, which made auto's choice and eval's estimate read a much weaker head than the one fitted on all of them
    (benchmarks/fewshot.py, issue 12, 10 seeds: glyphs, 4 suggested labels per class: auto 0.751 -> 0.766 on the
    unlabeled images, eval's estimate -0.070 -> -0.020 from the truth; random labels, balanced, are unchanged)."""
    from sklearn.model_selection import StratifiedKFold

    _, yi = encode_labels(y)
    counts = np.bincount(yi)
    if len(counts) < 2 or counts.min() < 2:
        return None
    skf = StratifiedKFold(n_splits=int(min(n_splits, counts.max())), shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only 2 members": intended, see above
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(skf.split(np.zeros(len(yi)), yi))


def calibrate(head, X, y, unlabeled=None, n_splits: int = 5, seed: int = 0, folds=None) -> float:
    """Set head.temperature from out-of-fold logits; returns T (1.0 when the labels are too few)."""
    folds = folds if folds is not None else make_folds(y, n_splits, seed)
    if folds is None:
        return head.temperature
    _, yi = encode_labels(y)
    head.temperature = fit_temperature(head.cv_logits(X, y, unlabeled, folds), yi)
    return head.temperature
