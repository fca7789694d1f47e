"""Forgetting: what a fine-tune does to search on the store's other images (the ones nobody labeled).

A seeded sample of unlabeled images; for each, one altered view (crop, flip, small rotation, colour
jitter: samples.photo_views) is embedded by the old and the new backbone and searched among that
version's vectors of the whole store. recall@k: how often the original image is among the k nearest.
Also the overlap of each sampled image's 10 nearest neighbours under the old and the new vectors (how
much search results change at all). A drop in recall means the new backbone lost invariances the
store's search relied on.
"""

from __future__ import annotations

import numpy as np

FORGET_SAMPLE = 48  # images sampled
FORGET_K = 5
WARN_DROP = 0.03  # a recall drop above this is reported as a warning


def _views(paths: list[str], pre, seed: int) -> list:
    from embedstore.ingest.pipeline import load_image
    from embedstore.samples import photo_views

    rng = np.random.default_rng(seed)
    out = []
    for p in paths:
        im = load_image(p, pre)
        out.append(photo_views(im, 1, rng, size=max(im.size), scale=(0.7, 1.0))[0])
    return out


def _recall(V: np.ndarray, X: np.ndarray, rows: np.ndarray, k: int) -> float:
    top = np.argsort(-(V @ X.T), axis=1)[:, :k]
    return float(np.mean([r in t for r, t in zip(rows, top)]))


def _overlap(X_old: np.ndarray, X_new: np.ndarray, rows: np.ndarray, k: int = 10) -> float:
    def nn(X):
        S = X[rows] @ X.T
        S[np.arange(len(rows)), rows] = -np.inf
        return np.argsort(-S, axis=1)[:, :k]

    a, b = nn(X_old), nn(X_new)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def near_duplicate_recall(old_bb, new_bb, ids: np.ndarray, paths: list[str], X_old: np.ndarray, X_new: np.ndarray,
                          exclude: set[int], n: int = FORGET_SAMPLE, k: int = FORGET_K, seed: int = 0) -> dict | None:
    """recall@k of altered views of sampled unlabeled images (ids/paths/X_* in the same order, the whole
    store), under the old and the new backbone; None when the store has no unlabeled image."""
    cand = np.flatnonzero([int(i) not in exclude for i in ids])
    if len(cand) == 0:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(cand, size=min(n, len(cand)), replace=False))
    views = _views([paths[r] for r in rows], old_bb.preprocess, seed)
    r_old = _recall(old_bb.embed_images(views), X_old, rows, k)
    r_new = _recall(new_bb.embed_images(views), X_new, rows, k)
    return {
        "k": k, "n": int(len(rows)), "recall_old": round(r_old, 4), "recall_new": round(r_new, 4),
        "drop": round(r_old - r_new, 4), "neighbour_overlap": round(_overlap(X_old, X_new, rows), 4),
        "what": "altered views of unlabeled images searched among the store: original in the top k",
    }


def forgetting_warning(f: dict | None) -> str | None:
    """A warning when near-duplicate recall dropped by more than WARN_DROP."""
    if not f or f.get("drop") is None or f["drop"] <= WARN_DROP:
        return None
    return (f"near-duplicate recall@{f['k']} on {f['n']} unlabeled images dropped {f['recall_old']:.3f} -> "
            f"{f['recall_new']:.3f}: search on images outside the labels got worse")
