"""Is a horizontal flip label-preserving for this collection? Decided from the labels, before training.

Flipping is the default augmentation of every fine-tuning recipe, and right for photos, scans and satellite
tiles; for digits, letters or anything with a handedness it teaches the backbone that a mirrored "2" is a
"2". The check: leave-one-out nearest-centroid accuracy of the labeled images under the frozen vectors, for
the images as they are and for their mirror images (embedded now, classified against the original
centroids). When mirroring costs more than FLIP_TOLERANCE of that accuracy, flips are left out. Measured
(2-core CPU, EfficientNet-Lite0): digits 0.700 -> 0.537 (off), letters in 38 fonts 0.690 -> 0.640 (off),
photo views 1.000 -> 1.000 (on).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FLIP_TOLERANCE = 0.02
MAX_CHECKED = 400  # labeled images embedded mirrored (a seeded sample)


def _loo_centroid_accuracy(X_ref: np.ndarray, y: np.ndarray, X_query: np.ndarray) -> float:
    """Accuracy of each query row against the unit class centroids of X_ref, its own row left out of its
    class's centroid (a class reduced to nothing can not win)."""
    classes, own = np.unique(y, return_inverse=True)
    onehot = np.eye(len(classes))[own]
    sums, counts = onehot.T @ X_ref, onehot.sum(0)
    S = X_query @ (sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)).T
    left = sums[own] - X_ref  # each row's own class without it
    rows = np.arange(len(y))
    S[rows, own] = np.where(counts[own] > 1, (X_query * left).sum(1) / (np.linalg.norm(left, axis=1) + 1e-12), -np.inf)
    return float(np.mean(S.argmax(1) == own))


def check_flip(bb, items: Sequence[tuple[int, str, str]], vectors: dict[int, np.ndarray], seed: int = 0) -> dict:
    """{"flip": bool, "accuracy", "mirrored", "n", "reason"} from (id, path, class) labeled items and their
    frozen vectors."""
    from PIL import ImageOps

    from embedstore.ingest.pipeline import load_image

    items = [it for it in items if int(it[0]) in vectors]
    y_all = np.array([c for _, _, c in items], dtype=object)
    counts = {c: int((y_all == c).sum()) for c in set(y_all)}
    items = [it for it in items if counts[it[2]] >= 2]  # leave-one-out needs a second image of the class
    if len({c for _, _, c in items}) < 2:
        return {"flip": True, "n": len(items), "accuracy": None, "mirrored": None,
                "reason": "too few labels per class to check: flips kept (the usual default)"}
    if len(items) > MAX_CHECKED:
        pick = np.sort(np.random.default_rng(seed).choice(len(items), MAX_CHECKED, replace=False))
        items = [items[k] for k in pick]
    y = np.array([c for _, _, c in items], dtype=object)
    X = np.stack([vectors[int(i)] for i, _, _ in items]).astype(np.float64)
    mirrored = bb.embed_images([ImageOps.mirror(load_image(p, bb.preprocess)) for _, p, _ in items]).astype(np.float64)
    acc, macc = _loo_centroid_accuracy(X, y, X), _loo_centroid_accuracy(X, y, mirrored)
    keep = acc - macc <= FLIP_TOLERANCE
    what = (f"leave-one-out centroid accuracy of {len(items)} labeled images {acc:.3f}, of their mirror images "
            f"{macc:.3f}")
    return {"flip": bool(keep), "n": len(items), "accuracy": round(acc, 4), "mirrored": round(macc, 4),
            "reason": f"{what}: flips {'kept' if keep else 'left out (mirroring changes what these images are)'}"}
