"""Self-training for the fine-tune: unlabeled images that the heads label confidently join the training fold
with their predicted class (pseudo-labels; Lee, 2013; Xie et al., "Noisy Student", CVPR 2020).

The head is `auto`, fit on the labels the backbone may train on only (never the decision fold, so the
decision stays on labels nothing in training has seen, directly or through a pseudo-label). Candidates: the
store's images without any label (a seeded sample of at most MAX_UNLABELED); kept: confidence (calibrated
top probability x familiarity) >= the threshold, per predicted class at most `per_label` x that class's
training labels, most confident first, so a class the head over-predicts cannot flood the training fold.
Round 1 labels with the frozen vectors; each further round (pseudo_rounds) re-labels the same candidates
with the vectors of the backbone the previous round trained, and trains again from the original weights.
"""

from __future__ import annotations

import numpy as np

from embedstore.labels.choice import MAX_UNLABELED, head_label
from embedstore.labels.heads import make_head


def candidates(classify, storage, version: str, seed: int = 0) -> np.ndarray:
    """Ids of `version`'s images without any label (a seeded sample of at most MAX_UNLABELED), sorted."""
    every_label = classify.labels.labels(source=None)
    ids = storage.vector_ids(version)
    cand = ids[~np.isin(ids, np.fromiter(every_label, np.int64, len(every_label)))]
    if len(cand) > MAX_UNLABELED:
        cand = np.sort(np.random.default_rng(seed).choice(cand, MAX_UNLABELED, replace=False))
    return cand


def choose(classify, version: str, lab_ids: np.ndarray, X_lab: np.ndarray, y: list[str], cand_ids: np.ndarray,
           cand_paths: list[str], X_cand: np.ndarray, threshold: float, per_label: float,
           trained: np.ndarray | None = None) -> tuple[list[tuple[int, str, str]], dict]:
    """Fit auto on (X_lab, y) as classify fits it (`trained`: label ids the vectors' backbone trained on, never
    scored) and keep the confident candidates within each class's quota: ((id, path, class) items, summary)."""
    h = make_head("auto")
    if trained is not None:
        h.score_mask = ~np.isin(lab_ids, trained)
        h.fit(X_lab, list(y), unlabeled=X_cand if len(X_cand) else None)
    else:
        classify.fit_on(h, lab_ids, X_lab, list(y), np.arange(len(cand_ids)), lambda pos: X_cand[pos], version)
    pred, conf, _ = h.decide(X_cand)
    quota = {c: int(per_label * n) for c, n in zip(*np.unique(np.asarray(y, dtype=str), return_counts=True))}
    taken: dict[str, int] = {}
    out = []
    for j in np.argsort(-conf, kind="stable"):
        c = pred[j]
        if conf[j] < threshold:
            break
        if c is None or taken.get(c, 0) >= quota.get(c, 0):
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append((int(cand_ids[j]), cand_paths[j], c))
    return out, {"kept": len(out), "per_class": dict(sorted(taken.items())), "head": head_label(h, "auto")}


def pseudo_labels(classify, storage, version: str, labels: dict[int, str], threshold: float, per_label: float,
                  seed: int = 0) -> tuple[list[tuple[int, str, str]], dict]:
    """Round 1: ((id, path, class) pseudo-labeled items, a summary for the output) from `version`'s vectors;
    `labels`: {id: class} the backbone may train on."""
    summary = {"threshold": threshold, "per_label": per_label, "candidates": 0, "kept": 0, "per_class": {}}
    if threshold <= 0 or per_label <= 0:
        return [], {**summary, "reason": "off"}
    cand = candidates(classify, storage, version, seed)
    summary["candidates"] = int(len(cand))
    if not len(cand):
        return [], {**summary, "reason": "no unlabeled images"}
    lab = storage.vectors(version, ids=sorted(labels))
    unl = storage.vectors(version, ids=cand)
    out, s = choose(classify, version, lab.ids, lab.vectors, [labels[int(i)] for i in lab.ids], unl.ids,
                    list(unl.paths), unl.vectors, threshold, per_label)
    return out, {**summary, **s}


def relabel(classify, storage, version: str, bb, model, labels: dict[int, str], threshold: float, per_label: float,
            seed: int = 0) -> tuple[list[tuple[int, str, str]], dict]:
    """A further round: the same candidates and labels embedded by `model` (a trained copy of bb.image_model),
    auto fit on them (never scored on labels: the model trained or selected on all of them), confident
    candidates kept."""
    import dataclasses

    cand = candidates(classify, storage, version, seed)
    lab, unl = storage.vectors(version, ids=sorted(labels)), storage.vectors(version, ids=cand)
    student = dataclasses.replace(bb, image_model=model.to(bb.device))
    try:
        X_lab, X_cand = student.embed_images(list(lab.paths)), student.embed_images(list(unl.paths))
    finally:
        model.to("cpu")
    out, s = choose(classify, version, lab.ids, X_lab, [labels[int(i)] for i in lab.ids], unl.ids, list(unl.paths),
                    X_cand, threshold, per_label, trained=lab.ids)
    return out, {"threshold": threshold, "per_label": per_label, "candidates": int(len(cand)), **s}
