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

import dataclasses

import numpy as np

from embedstore.labels.choice import MAX_UNLABELED, head_label
from embedstore.labels.heads import make_head
from embedstore.results import VectorSet


@dataclasses.dataclass
class Pool:
    """What self-training works from: the labels it may use and the unlabeled candidates, frozen vectors."""

    lab: VectorSet
    y: list[str]
    cand: VectorSet
    threshold: float
    per_label: float

    def summary(self, **kw) -> dict:
        return {"threshold": self.threshold, "per_label": self.per_label, "candidates": len(self.cand.ids), **kw}


def make_pool(classify, storage, version: str, lab: VectorSet, labels: dict[int, str], threshold: float,
              per_label: float, seed: int = 0) -> Pool:
    """`lab`: `version`'s vectors of the labels the backbone may train on ({id: class} `labels`); candidates:
    `version`'s images without any label, a seeded sample of at most MAX_UNLABELED."""
    every_label = classify.labels.labels(source=None)
    ids = storage.vector_ids(version) if threshold > 0 and per_label > 0 else np.zeros(0, np.int64)
    cand = ids[~np.isin(ids, np.fromiter(every_label, np.int64, len(every_label)))]
    if len(cand) > MAX_UNLABELED:
        cand = np.sort(np.random.default_rng(seed).choice(cand, MAX_UNLABELED, replace=False))
    return Pool(lab, [labels[int(i)] for i in lab.ids], storage.vectors(version, ids=cand), threshold, per_label)


def choose(pool: Pool, X_lab: np.ndarray, X_cand: np.ndarray, trained: np.ndarray) -> tuple[list[tuple[int, str, str]], dict]:
    """Fit auto on (X_lab, pool.y) as classify fits it (never scored on `trained`: label ids the vectors'
    backbone trained on) and keep the confident candidates within each class's quota:
    ((id, path, class) items, summary)."""
    if pool.threshold <= 0 or pool.per_label <= 0:
        return [], pool.summary(kept=0, per_class={}, reason="off")
    if not len(X_cand) or len(set(pool.y)) < 2:
        return [], pool.summary(kept=0, per_class={}, reason="no unlabeled images or fewer than 2 classes")
    h = make_head("auto")
    h.score_mask = ~np.isin(pool.lab.ids, trained) if len(trained) else None
    h.fit(X_lab, pool.y, unlabeled=X_cand)
    pred, conf, _ = h.decide(X_cand)
    quota = {c: int(pool.per_label * n) for c, n in zip(*np.unique(np.asarray(pool.y, dtype=str), return_counts=True))}
    taken: dict[str, int] = {}
    out = []
    for j in np.argsort(-conf, kind="stable"):
        c = pred[j]
        if conf[j] < pool.threshold:
            break
        if c is None or taken.get(c, 0) >= quota.get(c, 0):
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append((int(pool.cand.ids[j]), pool.cand.paths[j], c))
    return out, pool.summary(kept=len(out), per_class=dict(sorted(taken.items())), head=head_label(h, "auto"))


def pseudo_labels(classify, pool: Pool) -> tuple[list[tuple[int, str, str]], dict]:
    """Round 1: from the frozen vectors (auto never scored on what the parent version's backbone trained on)."""
    return choose(pool, pool.lab.vectors, pool.cand.vectors, classify.trained_ids(pool.lab.version))


def relabel(pool: Pool, bb, model) -> tuple[list[tuple[int, str, str]], dict]:
    """A further round: the same labels and candidates embedded by `model` (a trained copy of bb.image_model);
    auto never scored on the labels (the model trained or selected on all of them)."""
    student = dataclasses.replace(bb, image_model=model.to(bb.device))
    try:
        X_lab, X_cand = student.embed_images(list(pool.lab.paths)), student.embed_images(list(pool.cand.paths))
    finally:
        model.to("cpu")
    return choose(pool, X_lab, X_cand, pool.lab.ids)
