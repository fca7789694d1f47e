"""suggest: unlabeled, non-duplicate, diverse images; uncertainty and class balance with labels."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from embedstore.errors import InvalidArgumentError
from embedstore.labels.suggest import select
from embedstore.results import Suggestion


def _groups(photo_labels):
    g = defaultdict(list)
    for p, c in sorted(photo_labels.items()):
        g[c].append(p)
    return g


def _add_near_duplicate(store, path, tmp_path):
    """Re-save a stored image as PNG (new bytes, same picture) and add it: a near-identical vector."""
    dup = tmp_path / "near_dup.png"
    Image.open(path).save(dup)
    store.add([dup], progress=False)
    ids, _ = store.resolve_items([path, dup])
    vs = store.vectors(ids=ids)
    assert float(vs.vectors[0] @ vs.vectors[1]) > 0.99
    return set(ids)


def test_suggest_without_labels_is_diverse_and_deduplicated(photo_store, photo_labels, tmp_path):
    pair = _add_near_duplicate(photo_store, _groups(photo_labels)["coffee"][5], tmp_path)
    res = photo_store.suggest(8)
    ids = [r.id for r in res]
    assert len(ids) == 8 == len(set(ids))
    assert len(pair & set(ids)) <= 1
    # 8 k-means++ picks out of 8 photo classes cover most of them
    truth = {p: c for p, c in photo_labels.items()}
    assert len({truth.get(r.path, "dup") for r in res}) >= 5


def test_suggest_with_labels(photo_store, photo_labels, tmp_path):
    g = _groups(photo_labels)
    for c in ("astronaut", "chelsea", "coffee"):
        photo_store.label(g[c][:3], c)
    photo_store.label(g["horse"][:1], "horse")  # a rare class
    pair = _add_near_duplicate(photo_store, g["rocket"][4], tmp_path)
    labeled = set(photo_store.labels())
    res = photo_store.suggest(80)  # more than there are: every unlabeled non-duplicate at most once
    ids = [r.id for r in res]
    assert len(ids) == len(set(ids)) and not (set(ids) & labeled)
    assert len(pair & set(ids)) == 1
    n_unlabeled = photo_store.count_images() - len(labeled)
    assert len(ids) == n_unlabeled - 1
    for r in res:
        assert isinstance(r, Suggestion) and set(r.to_dict()) >= {"id", "path", "score", "reason", "prediction", "margin"}
    scores = [r.score for r in res[:5]]
    assert scores[0] > 0
    # the first picks are far from what is labeled: none of the three well-labeled classes leads
    first = [photo_labels.get(r.path) for r in res[:5]]
    assert sum(c in ("astronaut", "chelsea", "coffee") for c in first) <= 1
    with pytest.raises(InvalidArgumentError):
        photo_store.suggest(0)


def test_select_prefers_uncertain_then_spreads():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    u = np.zeros(200, np.float32)
    u[17] = 1.0
    rows, parts = select(X, 5, uncertainty=u, weights={"uncertainty": 1.0, "diversity": 0.1, "balance": 0})
    assert rows[0] == 17 and len(set(rows)) == 5
    # pure coverage: each pick is the farthest from the ones before
    rows, parts = select(X, 3, weights={"uncertainty": 0, "diversity": 1, "balance": 0})
    sims = X[rows[2]] @ X[rows[:2]].T
    others = np.max(X @ X[rows[:2]].T, axis=1)
    assert sims.max() <= np.sort(others)[1] + 1e-6


def test_weights_move_from_coverage_to_margins_as_labels_grow():
    from embedstore.labels.suggest import LATE_WEIGHTS, RAMP_TO, WEIGHTS, weights_for

    assert weights_for(1) == pytest.approx(WEIGHTS) and weights_for(RAMP_TO) == pytest.approx(LATE_WEIGHTS)
    assert weights_for(50) == pytest.approx(LATE_WEIGHTS)
    u = [weights_for(k)["uncertainty"] for k in (1, 2, 3, 4)]
    assert u == sorted(u) and u[0] < u[-1] and WEIGHTS["coverage"] > LATE_WEIGHTS["coverage"]


def test_rank_with_many_labels_asks_about_the_boundary():
    """Two overlapping classes, 6 labels each from their cores: margin-led picks sit where the classes meet."""
    from embedstore.labels.heads import make_head
    from embedstore.labels.suggest import rank

    rng = np.random.default_rng(0)
    d = 16
    mu = np.zeros((2, d), np.float32)
    mu[0, 0], mu[1, 0] = 1.0, -1.0
    t = rng.uniform(-1, 1, 400)  # position along the axis joining the two classes
    X = (t[:, None] * mu[0] + 0.15 * rng.normal(size=(400, d)) + np.eye(d, dtype=np.float32)[1]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.where(t > 0, "a", "b")
    lab = np.r_[np.argsort(-t)[:6], np.argsort(t)[:6]]  # the cores
    unl = np.setdiff1d(np.arange(400), lab)
    Xc = X[unl]
    before = Xc.copy()
    picks = rank(X[lab], list(y[lab]), Xc, 5, make_head)
    assert np.array_equal(Xc, before)  # centred on a copy unless overwrite=True
    assert len({p["row"] for p in picks}) == 5
    assert np.abs(t[unl[[p["row"] for p in picks]]]).mean() < 0.25  # near the boundary (|t| small); coverage-led: 0.44
    assert sum(p["reason"].startswith("uncertain between") for p in picks) >= 3


def test_near_duplicates_are_judged_before_centring():
    """Vectors sharing a large common part: a pair at raw cosine > 0.99 can sit far below 0.99 once the mean is
    subtracted; suggest still offers only one of the two, and reports raw nearest similarities."""
    from embedstore.labels.heads import make_head
    from embedstore.labels.heads.vectors import centre_rows
    from embedstore.labels.suggest import rank

    rng = np.random.default_rng(1)
    d = 24
    common = np.zeros(d, np.float32)
    common[0] = 6.0
    X = (common + rng.normal(size=(120, d))).astype(np.float32)
    X[119] = X[118] + 0.2 * rng.normal(size=d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    C = centre_rows(X, X.mean(0))[0]
    assert float(X[118] @ X[119]) > 0.99 > float(C[118] @ C[119])
    y = np.where(X[:, 1] > 0, "a", "b")
    lab = np.r_[np.flatnonzero(y == "a")[:3], np.flatnonzero(y == "b")[:3]]
    unl = np.setdiff1d(np.arange(120), lab)
    picks = rank(X[lab], list(y[lab]), X[unl], len(unl), make_head)
    rows = {int(unl[p["row"]]) for p in picks}
    assert len(rows & {118, 119}) == 1
    assert len(rows) == len(unl) - 1
    raw_nearest = (X[unl] @ X[lab].T).max(1)
    first = picks[0]
    assert first["parts"]["nearest_similarity"] == pytest.approx(float(raw_nearest[first["row"]]), abs=1e-4)
