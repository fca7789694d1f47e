"""What to label next: representative images first, then the ones the head is unsure of, classes balanced.

Each unlabeled image gets four scores in [0, 1]:
  uncertainty  1 - margin between the head's (a balanced linear probe's) top two classes (margin sampling),
  diversity    how far it is from every labeled or already-suggested image (greedy coverage: each pick
               updates the distances, so a batch does not pile up in one corner of embedding space),
  balance      how rare its predicted class is among the labels (rarest class = 1),
  coverage     facility location: how much closer labeling it brings the (sampled) unlabeled collection to
               its nearest labeled image, i.e. dense regions no label stands for yet.
The pick maximises a weighted sum, one image at a time; the weights move from coverage-led (one label per
class) to margin-led (RAMP_TO labels per class and more), see weights_for(). Vectors are compared after
subtracting the collection mean (CL2N). Near-identical vectors (cosine above `dedup`)
to a labeled or already-picked image are skipped: labeling a duplicate teaches nothing.
Without two labeled classes there is no head yet: the picks are k-means++ seeds (diverse and
representative), again without duplicates.
"""

from __future__ import annotations

import numpy as np

from embedstore.errors import InvalidArgumentError
from embedstore.labels.heads.vectors import centre_rows
from embedstore.results import Suggestion

# Measured in benchmarks/fewshot.py (issue 12): the first weights (uncertainty 0.5, diversity 0.35, balance 0.15,
# no coverage) needed 8 labels per class to match 8 random ones on digits, glyphs and icons; coverage-led weights
# (below) matched them with 6 (digits) and 3 (icons). Few labels: representative images teach more than
# uncertain ones (Hacohen et al. 2022, "Active learning on a budget"); with more labels the head's margins
# become worth trusting (Doucet et al. 2023, "TCM": typicality first, then margin). weights_for() moves from one
# to the other as labels per class grow.
WEIGHTS = {"uncertainty": 0.15, "diversity": 0.0, "balance": 0.1, "coverage": 0.75}
LATE_WEIGHTS = {"uncertainty": 0.5, "diversity": 0.0, "balance": 0.1, "coverage": 0.4}
RAMP_TO = 4.0  # labels per class from which LATE_WEIGHTS apply
REFERENCE_CELLS = 20_000_000  # candidates x reference points held for the coverage term (80 MB of float32)


def weights_for(labels_per_class: float) -> dict:
    """The mix for this many labels per class: WEIGHTS at one, LATE_WEIGHTS from RAMP_TO on, linear between."""
    t = float(np.clip((labels_per_class - 1.0) / (RAMP_TO - 1.0), 0.0, 1.0))
    return {k: (1 - t) * WEIGHTS[k] + t * LATE_WEIGHTS[k] for k in WEIGHTS}


def max_similarity(Q: np.ndarray, L: np.ndarray, block: int = 16384, raw: "Uncentre | None" = None) -> np.ndarray:
    """Per row of Q, its largest cosine similarity to any row of L (-1 when L is empty); with `raw`, Q and L are
    centred and the similarity is that of the vectors before centring."""
    if len(L) == 0:
        return np.full(len(Q), -1.0, np.float32)
    out = np.empty(len(Q), np.float32)
    for i in range(0, len(Q), block):
        S = Q[i : i + block] @ L.T
        out[i : i + block] = (S if raw is None else raw.to_labeled(S, slice(i, i + block))).max(1)
    return out


class Uncentre:
    """Cosines of the vectors before centring from those after: x = a c + mean (a = |x - mean|, c unit), so
    x . y = a_x a_y (c_x . c_y) + b_x + b_y + mean . mean with b = a (c . mean). Keeps `dedup` and the reported
    nearest similarity in the collection's own terms without a second full-size copy of the candidates."""

    def __init__(self, Xc: np.ndarray, a: np.ndarray, L: np.ndarray, la: np.ndarray, mean: np.ndarray):
        self.a, self.la, self.mm = a, la, float(mean @ mean)
        self.b = a * (Xc @ mean)
        self.lb = la * (L @ mean) if len(L) else np.zeros(0, np.float32)

    @staticmethod
    def _raw(S, a1, b1, a2, b2, mm):
        return a1 * a2 * S + b1 + b2 + mm

    def to_labeled(self, S: np.ndarray, rows: slice) -> np.ndarray:
        """Raw cosines of candidates `rows` to every labeled vector, from their centred ones S."""
        return self._raw(S, self.a[rows, None], self.b[rows, None], self.la[None, :], self.lb[None, :], self.mm)

    def row(self, s: np.ndarray, j: int) -> np.ndarray:
        """Raw cosines of every candidate to candidate j, from their centred ones s."""
        return self._raw(s, self.a, self.b, self.a[j], self.b[j], self.mm)


def select(
    X: np.ndarray,
    n: int,
    uncertainty: np.ndarray | None = None,
    balance: np.ndarray | None = None,
    labeled: np.ndarray | None = None,
    weights: dict | None = None,
    dedup: float = 0.99,
    raw: Uncentre | None = None,
) -> tuple[list[int], list[dict]]:
    """Greedy batch selection over candidate vectors X (rows L2-normalised). With `raw` (X and labeled centred),
    near-duplicates and nearest similarities are judged on the vectors before centring.

    Returns the chosen rows and, per pick, its parts {uncertainty, diversity, balance, score,
    nearest_similarity}. Pure numpy over arrays: usable on vectors from anywhere.
    """
    w = {**WEIGHTS, **(weights or {})}
    m = len(X)
    u = np.zeros(m, np.float32) if uncertainty is None else np.asarray(uncertainty, np.float32)
    b = np.zeros(m, np.float32) if balance is None else np.asarray(balance, np.float32)
    L = labeled if labeled is not None else np.zeros((0, X.shape[1]), np.float32)
    nearest = max_similarity(X, L, raw=raw)
    blocked = nearest > dedup
    if w.get("coverage", 0) > 0:  # facility location over a sample of the candidates (the collection to stand for)
        r = int(min(m, 1000, max(100, REFERENCE_CELLS // max(m, 1))))
        R = X[np.random.default_rng(0).choice(m, r, replace=False)] if r < m else X
        SR, near_r = X @ R.T, max_similarity(R, L)
    chosen: list[int] = []
    parts: list[dict] = []
    for _ in range(min(n, m)):
        d = (1.0 - nearest) / 2.0  # cosine distance in [0, 1]
        avail = ~blocked
        if not avail.any():
            break
        top = d[avail].max()
        dn = d / top if top > 0 else np.zeros_like(d)
        cov = np.zeros(m, np.float32)
        if w.get("coverage", 0) > 0:  # how much closer it brings the collection to the labeled set
            gain = np.maximum(SR - near_r, 0).sum(1)
            cov = gain / gain.max() if gain.max() > 0 else cov
        score = w["uncertainty"] * u + w["diversity"] * dn + w["balance"] * b + w.get("coverage", 0) * cov
        score[blocked] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        parts.append(
            {
                "uncertainty": float(u[j]),
                "diversity": float(dn[j]),
                "balance": float(b[j]),
                "coverage": float(cov[j]),
                "score": float(score[j]),
                "nearest_similarity": float(nearest[j]),
            }
        )
        s = X @ X[j]
        if raw is not None:
            s = raw.row(s, j)
        blocked |= s > dedup
        blocked[j] = True
        np.maximum(nearest, s, out=nearest)
        if w.get("coverage", 0) > 0:
            np.maximum(near_r, SR[j], out=near_r)
    return chosen, parts


def kmeanspp(X: np.ndarray, n: int, seed: int = 0, dedup: float = 0.99) -> list[int]:
    """n diverse, representative rows: k-means++ seeding (sklearn), then near-duplicates dropped."""
    from sklearn.cluster import kmeans_plusplus

    if len(X) == 0:
        return []
    k = min(len(X), n + max(4, n // 4))
    _, idx = kmeans_plusplus(X, n_clusters=k, random_state=seed)
    out: list[int] = []
    for j in idx:
        if all(float(X[j] @ X[i]) <= dedup for i in out):
            out.append(int(j))
        if len(out) == n:
            break
    return out


def rank(XL: np.ndarray, y: list[str], Xc: np.ndarray, n: int, make_head, head: str = "linear",
         weights: dict | None = None, dedup: float = 0.99, seed: int = 0, center: bool = True,
         overwrite: bool = False) -> list[dict]:
    """Pure arrays: up to n rows of the candidates Xc to label next, best first, given labeled XL with
    classes y. Each pick: {row, score, reason, prediction, margin, parts}. `make_head(name)` builds the head.
    Once two classes are labeled, `center` subtracts the collection mean first (SimpleShot's CL2N): the head's
    margins and the coverage term then see what tells images apart rather than what they all share.
    `weights` (partial) override weights_for(the mean labels per class). `overwrite`: Xc may be centred in place."""
    classes = sorted(set(y))
    if len(classes) < 2:  # no head yet: cover the collection, away from whatever is labeled
        if len(XL):
            rows, parts = select(Xc, n, labeled=XL, weights={"uncertainty": 0, "balance": 0, "diversity": 1}, dedup=dedup)
            return [{"row": j, "score": p["score"], "parts": p, "prediction": None, "margin": None,
                     "reason": f"unlike the labeled images (nearest similarity {p['nearest_similarity']:.2f})"}
                    for j, p in zip(rows, parts)]
        return [{"row": j, "score": 1.0, "parts": None, "prediction": None, "margin": None,
                 "reason": "diverse sample of the collection (k-means++)"} for j in kmeanspp(Xc, n, seed=seed, dedup=dedup)]
    if center:
        mean = ((XL.sum(0, dtype=np.float64) + Xc.sum(0, dtype=np.float64)) / (len(XL) + len(Xc))).astype(np.float32)
        XL, na = centre_rows(XL, mean)
        Xc, nc = centre_rows(Xc, mean, overwrite)
        raw = Uncentre(Xc, nc, XL, na, mean)
    else:
        raw = None
    w = {**weights_for(len(y) / len(classes)), **(weights or {})}
    h = make_head(head)
    h.fit(XL, y, unlabeled=Xc)
    P = h.predict_proba(Xc)
    order = np.argsort(-P, axis=1)[:, :2]
    p1 = np.take_along_axis(P, order[:, :1], 1)[:, 0]
    p2 = np.take_along_axis(P, order[:, 1:2], 1)[:, 0]
    margin = p1 - p2
    counts = {c: y.count(c) for c in h.classes}
    rarest = min(counts.values())
    balance = np.array([rarest / counts[h.classes[k]] for k in order[:, 0]], np.float32)
    rows, parts = select(Xc, n, uncertainty=1 - margin, balance=balance, labeled=XL, weights=w, dedup=dedup, raw=raw)
    out = []
    for j, p in zip(rows, parts):
        c1, c2 = h.classes[order[j, 0]], h.classes[order[j, 1]]
        contrib = {k: w[k] * p[k] for k in ("uncertainty", "diversity", "balance", "coverage")}
        why = max(contrib, key=contrib.get)
        reason = {
            "uncertainty": f"uncertain between {c1} and {c2} (margin {margin[j]:.2f})",
            "diversity": f"unlike the labeled images (nearest similarity {p['nearest_similarity']:.2f})",
            "balance": f"probably {c1}, a class with only {counts[c1]} label(s)",
            "coverage": f"stands for many unlabeled images no label is near (probably {c1})",
        }[why]
        out.append({"row": j, "score": p["score"], "parts": p, "prediction": c1, "margin": float(margin[j]), "reason": reason})
    return out


def suggest(
    clf, n: int = 24, head: str = "linear", weights: dict | None = None, dedup: float = 0.99, seed: int = 0
) -> list[Suggestion]:
    """Up to n unlabeled, non-duplicate images to label next, best first."""
    if n < 1:
        raise InvalidArgumentError(f"n must be at least 1, got {n}")
    vs = clf.storage.vectors()
    labels = clf.labels.labels(source=None)
    is_lab = np.array([int(i) in labels for i in vs.ids], bool)
    cand = np.flatnonzero(~is_lab)
    if len(cand) == 0:
        return []
    y = [labels[int(i)] for i in vs.ids[is_lab]]
    picks = rank(vs.vectors[is_lab], y, vs.vectors[cand], n, clf.make_head, head, weights, dedup, seed, overwrite=True)
    return [_row(vs, cand[p["row"]], p["score"], p["reason"], p["prediction"], p["margin"], p["parts"]) for p in picks]


def _row(vs, pos, score, reason, prediction, margin, parts) -> Suggestion:
    return Suggestion(
        id=int(vs.ids[pos]),
        path=vs.paths[pos],
        score=round(float(score), 4),
        reason=reason,
        prediction=prediction,
        margin=None if margin is None else round(margin, 4),
        nearest_similarity=None if parts is None else round(parts["nearest_similarity"], 4),
    )
