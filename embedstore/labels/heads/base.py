"""The head interface every few-shot head implements.

All heads work on L2-normalised float32 vectors (N, D). Classes are strings. Probabilities are
(N, C) rows summing to 1 over `classes` (in that order). Heads that need the whole collection
(transductive propagation, CL2N centering) receive it through `fit(..., unlabeled=U)`.

A head computes log-scores in `_logits(X)`; `predict_proba` is `softmax(logits / temperature)`, so
temperature scaling (calibrate.py) applies to every head the same way. `center=True` turns on
SimpleShot's CL2N: subtract the collection mean (labeled + unlabeled), re-normalise.

Persistence: `head.save(path)` writes one .npz (arrays + a JSON header with the head's name and
parameters); `load_head(path)` (or `HeadClass.load(path)`) restores it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.errors import InvalidArgumentError
from embedstore.labels.heads.calibrate import calibrate
from embedstore.labels.heads.vectors import check_vectors, cl2n, encode_labels, l2n, softmax  # re-exported

# name -> class; filled by the @register decorator (heads/__init__.py imports every head module)
HEADS: dict[str, type["Head"]] = {}


def register(cls: type["Head"]) -> type["Head"]:
    if cls.name in HEADS:
        raise ValueError(f"head name '{cls.name}' registered twice")
    HEADS[cls.name] = cls
    return cls


def abstain(P: np.ndarray, threshold: float | None = None, classes: list[str] | None = None):
    """Open-set decision: the argmax class, or "unknown" where the top probability is below `threshold`.

    Returns an int array (-1 = unknown) when `classes` is None, else a list of class names with None
    for unknown. threshold=None never abstains.
    """
    P = np.asarray(P)
    idx = P.argmax(1) if len(P) else np.zeros(0, dtype=np.int64)
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise InvalidArgumentError(f"threshold must be between 0 and 1, got {threshold}; try 0.5")
        idx = np.where(P.max(1) >= float(threshold), idx, -1) if len(P) else idx
    if classes is None:
        return idx
    return [classes[i] if i >= 0 else None for i in idx]


@contextmanager
def few_threads(enable: bool = True):
    """One BLAS/torch thread for small problems: thread start-up and contention cost more than they save."""
    if not enable:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- the interface
class Head(ABC):
    name: str = "base"
    # constructor parameters saved with the head (subclasses extend)
    params: tuple[str, ...] = ("center",)

    classes: list[str]

    def __init__(self, center: bool = False):
        self.center = bool(center)
        self.mean: np.ndarray | None = None  # CL2N mean, set in fit when center=True
        self.temperature: float = 1.0
        self.classes = []
        self.support: np.ndarray | None = None  # the labeled vectors (L2-normalised, uncentred), for familiarity
        self.support_range: tuple[float, float] | None = None

    # -- to implement
    @abstractmethod
    def fit(self, X: np.ndarray, y: list[str] | np.ndarray, unlabeled: np.ndarray | None = None) -> "Head":
        """Fit on labeled vectors X (N, D) with class names y; `unlabeled` is the rest of the collection."""

    @abstractmethod
    def _logits(self, X: np.ndarray) -> np.ndarray:
        """(M, C) log-scores over self.classes for prepared (centred, normalised) vectors X."""

    def add_class(self, X: np.ndarray, name: str) -> "Head":
        """Make a new class predictable from a few examples without refitting on the whole collection."""
        raise NotImplementedError(f"head '{self.name}' cannot add a class in place; refit it")

    def _arrays(self) -> dict[str, np.ndarray]:
        """Fitted arrays to save (besides classes, mean, temperature)."""
        return {}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    # -- shared
    def _fit_mean(self, X: np.ndarray, unlabeled: np.ndarray | None) -> None:
        if self.center:
            parts = [X] if unlabeled is None or len(unlabeled) == 0 else [X, unlabeled]
            n = sum(len(p) for p in parts)
            self.mean = (sum(p.sum(0, dtype=np.float64) for p in parts) / n).astype(np.float32)
        else:
            self.mean = None

    def _prep(self, X: np.ndarray) -> np.ndarray:
        return cl2n(check_vectors(X), self.mean)

    def _check_fitted(self) -> None:
        if not self.classes:
            raise InvalidArgumentError(f"head '{self.name}' is not fitted; call fit(X, y) first")

    def logits(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = self._prep(X)
        if len(X) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self._logits(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(M, C) calibrated probabilities over self.classes."""
        return softmax(self.logits(X) / self.temperature).astype(np.float32)

    def predict(self, X: np.ndarray, threshold: float | None = None) -> list[str | None]:
        """Class names; with a threshold, None where `decide`'s confidence is below it (open set)."""
        if threshold is None:
            return abstain(self.predict_proba(X), None, self.classes)
        return self.decide(X, threshold)[0]

    # -- open set
    def _remember(self, X: np.ndarray, append: bool = False) -> None:
        """Keep the labeled vectors: `familiarity` compares queries with them."""
        Xn = l2n(X)
        self.support = np.vstack([self.support, Xn]) if append and self.support is not None else Xn
        S = self.support @ self.support.T
        n = len(S)
        if n < 3:
            self.support_range = None
            return
        off = S[~np.eye(n, dtype=bool)]
        np.fill_diagonal(S, -np.inf)
        near = S.max(1)  # each labeled vector's nearest other labeled vector
        lo, hi = float(off.mean()), float(np.percentile(near, 25))
        self.support_range = (lo, hi) if hi > lo + 1e-3 else None

    def familiarity(self, X: np.ndarray) -> np.ndarray:
        """(M,) in [0, 1]: 1 when a vector is as close to the labeled examples as they are to each other,
        0 when it is no closer than unrelated labeled examples are (an image of none of the classes)."""
        X = check_vectors(X)
        if self.support is None or self.support_range is None or len(X) == 0:
            return np.ones(len(X), np.float32)
        lo, hi = self.support_range
        s = (l2n(X) @ self.support.T).max(1)
        return np.clip((s - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def decide(self, X: np.ndarray, threshold: float | None = None) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """Open-set predictions: (labels with None for unknown, confidence (M,), probabilities (M, C)).

        confidence = top calibrated probability x familiarity, so an image unlike every labeled one gets
        low confidence even when one class wins the softmax; below `threshold` the label is None."""
        P = self.predict_proba(X)
        conf = (P.max(1) if len(P) else np.zeros(0, np.float32)) * self.familiarity(X)
        labels = abstain(P, None, self.classes)
        if threshold is not None:
            abstain(P[:0], threshold)  # validates the threshold
            labels = [c if k >= threshold else None for c, k in zip(labels, conf)]
        return labels, conf.astype(np.float32), P

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.params}

    def clone(self) -> "Head":
        """An unfitted head with the same parameters."""
        return type(self)(**self.get_params())

    def _new_class(self, name: str) -> None:
        name = str(name)
        if name in self.classes:
            raise InvalidArgumentError(f"class '{name}' already exists; use fit() to add examples to it")
        self._check_fitted()
        self.classes.append(name)

    def fit_calibrated(self, X, y, unlabeled=None, n_splits: int = 5, seed: int = 0) -> "Head":
        """fit(), then temperature scaling on out-of-fold predictions (needs >= 2 labels per class)."""
        self.fit(X, y, unlabeled)
        calibrate(self, X, y, unlabeled, n_splits=n_splits, seed=seed)
        return self

    def cv_logits(self, X, y, unlabeled=None, folds=None) -> np.ndarray:
        """Out-of-fold logits (N, C) over `encode_labels(y)[0]`: each fold fitted on the other folds, with the
        held-out vectors joining the unlabeled ones (transductive heads may use them, never their labels).
        Classes absent from a fold's training part get -1e4."""
        X = np.asarray(X, np.float32)
        classes, yi = encode_labels(y)
        y = np.asarray([str(c) for c in y], dtype=object)
        out = np.full((len(X), len(classes)), -1e4, np.float32)
        for tr, te in folds:
            U = X[te] if unlabeled is None or len(unlabeled) == 0 else np.vstack([X[te], unlabeled])
            h = self.clone().fit(X[tr], y[tr], U)
            cols = [classes.index(c) for c in h.classes]
            out[np.ix_(te, cols)] = h.logits(X[te])
        return out

    # -- persistence: one .npz with a JSON header
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        header = {
            "name": self.name,
            "params": self.get_params(),
            "classes": list(self.classes),
            "temperature": float(self.temperature),
        }
        arrays = {f"a_{k}": np.asarray(v) for k, v in self._arrays().items()}
        if self.mean is not None:
            arrays["mean"] = self.mean
        if self.support is not None:
            arrays["support"] = self.support
        header["support_range"] = list(self.support_range) if self.support_range else None
        return header, arrays

    @classmethod
    def _from_state(cls, header: dict, arrays: dict[str, np.ndarray]) -> "Head":
        head = cls._from_params(header["params"])
        head.classes = list(header["classes"])
        head.temperature = float(header["temperature"])
        head.mean = arrays.get("mean")
        head.support = arrays.get("support")
        head.support_range = tuple(header["support_range"]) if header.get("support_range") else None
        head._set_arrays({k[2:]: v for k, v in arrays.items() if k.startswith("a_")})
        return head

    def save(self, path: str | Path) -> None:
        header, arrays = self._state()
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Head":
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in z.files if k != "header"}
        except (OSError, ValueError, KeyError) as e:
            raise InvalidArgumentError(f"'{path}' is not a saved head ({e}); save one with head.save(path)") from e
        head = restore(header, arrays)
        if cls is not Head and not isinstance(head, cls):
            raise InvalidArgumentError(f"'{path}' holds a '{header['name']}' head, not '{cls.name}'; use load_head()")
        return head

    @classmethod
    def _from_params(cls, params: dict) -> "Head":
        return cls(**params)


def restore(header: dict, arrays: dict[str, np.ndarray]) -> Head:
    """A head from its saved (header, arrays), dispatched on the header's name."""
    klass = HEADS.get(header["name"])
    if klass is None:
        raise InvalidArgumentError(f"unknown saved head '{header['name']}'; known: {sorted(HEADS)}")
    return klass._from_state(header, arrays)


def load_head(path: str | Path) -> Head:
    """Load any saved head."""
    return Head.load(path)
