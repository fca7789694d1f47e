"""Self-training for the fine-tune: unlabeled images that the frozen heads label confidently join the training
fold with their predicted class (pseudo-labels; Lee, 2013; Xie et al., "Noisy Student", CVPR 2020).

The head is `auto`, fit on the frozen vectors of the labels the backbone may train on only (never the
decision fold, so the decision stays on labels nothing in training has seen, directly or through a
pseudo-label). Candidates: the store's images without any label (a seeded sample of at most MAX_UNLABELED);
kept: confidence (calibrated top probability x familiarity) >= the threshold, per predicted class at most
`per_label` x that class's training labels, most confident first, so a class the head over-predicts cannot
flood the training fold.
"""

from __future__ import annotations

import numpy as np

from embedstore.labels.choice import MAX_UNLABELED, head_label


def pseudo_labels(classify, storage, version: str, labels: dict[int, str], threshold: float, per_label: float,
                  seed: int = 0) -> tuple[list[tuple[int, str, str]], dict]:
    """((id, path, class) pseudo-labeled items, a summary for the output) for `version`'s unlabeled images;
    `labels`: {id: class} the backbone may train on."""
    summary = {"threshold": threshold, "per_label": per_label, "candidates": 0, "kept": 0, "per_class": {}}
    if threshold <= 0 or per_label <= 0:
        return [], {**summary, "reason": "off"}
    every_label = classify.labels.labels(source=None)
    ids = storage.vector_ids(version)
    cand = ids[~np.isin(ids, np.fromiter(every_label, np.int64, len(every_label)))]
    if len(cand) > MAX_UNLABELED:
        cand = np.sort(np.random.default_rng(seed).choice(cand, MAX_UNLABELED, replace=False))
    summary["candidates"] = int(len(cand))
    if not len(cand):
        return [], {**summary, "reason": "no unlabeled images"}
    lab = storage.vectors(version, ids=sorted(labels))
    unl = storage.vectors(version, ids=cand)
    y = [labels[int(i)] for i in lab.ids]
    from embedstore.labels.heads import make_head

    h = make_head("auto")
    classify.fit_on(h, lab.ids, lab.vectors, y, np.arange(len(unl.ids)), lambda pos: unl.vectors[pos], version)
    pred, conf, _ = h.decide(unl.vectors)
    quota = {c: int(per_label * n) for c, n in zip(*np.unique(y, return_counts=True))}
    order = np.argsort(-conf, kind="stable")
    taken: dict[str, int] = {}
    out = []
    for j in order:
        c = pred[j]
        if conf[j] < threshold:
            break
        if c is None or taken.get(c, 0) >= quota.get(c, 0):
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append((int(unl.ids[j]), unl.paths[j], c))
    return out, {**summary, "kept": len(out), "per_class": dict(sorted(taken.items())), "head": head_label(h, "auto")}
