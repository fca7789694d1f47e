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
    return centre_rows(X, mean)[0] if mean is not None else l2n(X)


def centre_rows(X: np.ndarray, mean: np.ndarray, overwrite: bool = False, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """CL2N in blocks, without full-size temporaries: (rows - mean re-normalised, each row's |x - mean|). In place
    when `overwrite` and X is float32 already (a million 1280-d vectors are 5 GB)."""
    X = X if overwrite and isinstance(X, np.ndarray) and X.dtype == np.float32 else np.array(X, np.float32)
    norms = np.empty(len(X), np.float32)
    for i in range(0, len(X), block):
        B = X[i : i + block]
        B -= mean
        norms[i : i + block] = np.linalg.norm(B, axis=1)
        B /= np.maximum(norms[i : i + block, None], 1e-12)
    return X, norms


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
