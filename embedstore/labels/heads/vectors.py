"""Small array helpers shared by the heads and by calibration: normalisation, softmax, label encoding.

A leaf module (numpy and embedstore.errors only), so base.py and calibrate.py can both import it.
"""

from __future__ import annotations

import numpy as np

from embedstore.errors import EmptyInputError, InvalidArgumentError


def l2n(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def cl2n(X: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """SimpleShot's CL2N: subtract the collection mean and re-normalise (identity when mean is None)."""
    X = np.asarray(X, dtype=np.float32)
    return l2n(X - mean) if mean is not None else l2n(X)


def softmax(Z: np.ndarray, axis: int = -1) -> np.ndarray:
    Z = Z - Z.max(axis=axis, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=axis, keepdims=True)


def check_vectors(X: np.ndarray, what: str = "vectors") -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise InvalidArgumentError(f"{what} must be a 2-D array (N, D), got shape {X.shape}; pass store.vectors().vectors")
    return X


def encode_labels(y, classes: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Class names (strings) -> (classes in first-seen order unless given, int index per row)."""
    y = [str(c) for c in y]
    if not y:
        raise EmptyInputError("no labeled vectors to fit on; label a few images of each class first")
    if classes is None:
        classes = list(dict.fromkeys(y))
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(y) - index.keys())
    if missing:
        raise InvalidArgumentError(f"labels {missing} are not among the head's classes {classes}")
    return list(classes), np.array([index[c] for c in y], dtype=np.int64)
