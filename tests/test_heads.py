"""Few-shot heads on real features: the packaged EfficientNet-Lite0 vectors of the conftest digit and
photo stores, each head against its scikit-learn reference on the same vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

import embedstore
from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError
from embedstore.labels.heads import HEADS, abstain, load_head, make_head

from conftest import TINY_CLIP


def _features(store_path):
    ids, paths, X = embedstore.open(store_path, create=False).vectors()
    return X, np.array([Path(p).parent.name for p in paths])


@pytest.fixture(scope="module")
def digits(digits_store_path):
    return _features(digits_store_path)


@pytest.fixture(scope="module")
def photos(photo_store_path):
    return _features(photo_store_path)


def split(y, shots, seed=0, classes=None):
    rng = np.random.default_rng(seed)
    classes = np.unique(y) if classes is None else classes
    sup = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes])
    qry = np.setdiff1d(np.flatnonzero(np.isin(y, classes)), sup)
    return sup, qry


def acc(head, X, y, sup, qry):
    head.fit(X[sup], list(y[sup]), unlabeled=X[qry])
    return float((np.array(head.predict(X[qry]), dtype=object) == y[qry]).mean())


def sk_acc(model, X, y, sup, qry):
    return float((model.fit(X[sup], y[sup]).predict(X[qry]) == y[qry]).mean())


def test_registry_and_bad_names():
    assert {"knn", "centroid", "linear", "zeroshot", "fused", "propagate", "auto"} <= set(HEADS)
    with pytest.raises(InvalidArgumentError, match="unknown head 'nope'"):
        make_head("nope")
    with pytest.raises(EmptyInputError):
        make_head("centroid").fit(np.zeros((0, 4), np.float32), [])
    with pytest.raises(InvalidArgumentError, match="not fitted"):
        make_head("knn").predict_proba(np.ones((1, 4), np.float32))


@pytest.mark.parametrize(
    "name, reference, margin",
    [
        ("knn", KNeighborsClassifier(n_neighbors=5), 0.03),
        ("centroid", NearestCentroid(), 0.03),
        ("linear", LogisticRegression(max_iter=1000), 0.03),
    ],
)
def test_head_vs_sklearn_reference(digits, name, reference, margin):
    X, y = digits
    ours, ref = [], []
    for seed in range(3):
        sup, qry = split(y, 8, seed)
        ours.append(acc(make_head(name), X, y, sup, qry))
        ref.append(sk_acc(reference, X, y, sup, qry))
    assert np.mean(ours) >= np.mean(ref) - margin, (name, ours, ref)
    assert np.mean(ours) > 0.5  # far above chance (0.1)


def test_linear_matches_logistic_regression_at_same_C(digits):
    X, y = digits
    sup, qry = split(y, 5)
    head = make_head("linear", C=1.0, Cs=()).fit(X[sup], list(y[sup]))
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(X[sup], y[sup])
    agree = (np.array(head.predict(X[qry])) == ref.predict(X[qry])).mean()
    assert agree >= 0.98
    P, Pref = head.predict_proba(X[qry]), ref.predict_proba(X[qry])
    order = [list(ref.classes_).index(c) for c in head.classes]
    assert np.abs(P - Pref[:, order]).max() < 0.02


def test_probabilities_are_distributions(photos):
    X, y = photos
    sup, qry = split(y, 3)
    for name in ("knn", "centroid", "linear", "propagate"):
        P = make_head(name).fit(X[sup], list(y[sup]), unlabeled=X[qry]).predict_proba(X[qry])
        assert P.shape == (len(qry), len(np.unique(y)))
        assert np.allclose(P.sum(1), 1, atol=1e-5) and (P >= 0).all()


def test_propagation_uses_the_unlabeled_vectors(digits):
    X, y = digits
    prop, cent = [], []
    for seed in range(3):
        sup, qry = split(y, 2, seed)
        prop.append(acc(make_head("propagate"), X, y, sup, qry))
        cent.append(acc(make_head("centroid"), X, y, sup, qry))
    assert np.mean(prop) > np.mean(cent), (prop, cent)


def test_auto_at_least_as_good_as_the_best_single_head(digits):
    X, y = digits
    singles = ("knn", "centroid", "linear", "propagate")
    scores = {n: [] for n in singles + ("auto",)}
    for seed in range(2):
        sup, qry = split(y, 4, seed)
        for n in scores:
            scores[n].append(acc(make_head(n), X, y, sup, qry))
    best = max(np.mean(scores[n]) for n in singles)
    assert np.mean(scores["auto"]) >= best - 0.01, scores
    head = make_head("auto").fit(X[sup], list(y[sup]), unlabeled=X[qry])
    assert head.chosen and set(head.cv_scores) >= set(singles)
    assert all(0 <= s["accuracy"] <= 1 for s in head.cv_scores.values())


def test_calibration_lowers_held_out_log_loss(digits):
    from embedstore.labels.heads.calibrate import nll

    X, y = digits
    sup, qry = split(y, 6)
    head = make_head("centroid").fit(X[sup], list(y[sup]))
    yi = np.array([head.classes.index(c) for c in y[qry]])
    before = nll(np.log(head.predict_proba(X[qry]) + 1e-12), yi)
    head.fit_calibrated(X[sup], list(y[sup]))
    after = nll(np.log(head.predict_proba(X[qry]) + 1e-12), yi)
    assert head.temperature != 1.0 and after < before


@pytest.mark.parametrize("name", ["knn", "centroid", "linear", "auto"])
def test_add_class_is_instant_and_correct(digits, name):
    X, y = digits
    known = [str(c) for c in range(8)]
    sup, qry = split(y, 4, classes=known)
    head = make_head(name).fit(X[sup], list(y[sup]), unlabeled=X[qry])
    before = head.predict_proba(X[qry])
    new = np.flatnonzero(y == "8")
    head.add_class(X[new[:4]], "8")
    assert head.classes[-1] == "8"
    P = head.predict_proba(X[new[4:]])
    assert P.shape[1] == 9
    assert (np.array(head.predict(X[new[4:]])) == "8").mean() >= 0.6
    if name == "centroid":  # nothing refitted: old prototypes unchanged
        assert (head.predict_proba(X[qry])[:, :8].argmax(1) == before.argmax(1)).all()
    with pytest.raises(InvalidArgumentError, match="already exists"):
        head.add_class(X[new[:1]], "8")


def test_abstain_on_out_of_set_vectors(digits, photos):
    X, y = digits
    Xp, _ = photos
    sup, qry = split(y, 8)
    for name in ("centroid", "linear", "auto"):
        head = make_head(name).fit(X[sup], list(y[sup]), unlabeled=X[qry])
        out = head.predict(Xp, threshold=0.3)
        inside = head.predict(X[qry], threshold=0.3)
        assert np.mean([p is None for p in out]) >= 0.95, name  # photos are none of the digit classes
        kept = [(p, t) for p, t in zip(inside, y[qry]) if p is not None]
        assert len(kept) >= 0.1 * len(qry) and np.mean([p == t for p, t in kept]) >= 0.8, name
    P = np.array([[0.9, 0.1], [0.55, 0.45]])
    assert abstain(P, 0.6, ["a", "b"]) == ["a", None]
    assert list(abstain(P, 0.6)) == [0, -1] and abstain(P, None, ["a", "b"]) == ["a", "a"]
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        abstain(P, 1.5)


@pytest.mark.parametrize("name", ["knn", "centroid", "linear", "propagate", "auto"])
def test_save_load_round_trip(photos, tmp_path, name):
    X, y = photos
    sup, qry = split(y, 3)
    head = make_head(name, **({"center": True} if name in ("centroid", "propagate") else {}))
    head.fit(X[sup], list(y[sup]), unlabeled=X[qry])
    head.save(tmp_path / "head.npz")
    again = load_head(tmp_path / "head.npz")
    assert type(again) is type(head) and again.classes == head.classes
    assert np.allclose(again.predict_proba(X[qry]), head.predict_proba(X[qry]), atol=1e-5)
    assert np.allclose(again.decide(X[qry])[1], head.decide(X[qry])[1], atol=1e-5)
    if name == "auto":
        assert again.chosen == head.chosen
    with pytest.raises(InvalidArgumentError):
        load_head(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def tiny_clip():
    from embedstore.ingest.backbones import load_backbone

    return load_backbone(TINY_CLIP)


@pytest.mark.parametrize("name", ["zeroshot", "fused"])
def test_zeroshot_and_fused_shapes(tiny_clip, photo_dir, tmp_path, name):
    files = sorted(photo_dir.rglob("*.jpg"))[::5][:12]
    X = tiny_clip.embed_images(files)
    y = [f.parent.name for f in files]
    head = make_head(name, text_encoder=tiny_clip.embed_texts).fit(X, y)
    P = head.predict_proba(X)
    assert P.shape == (len(X), len(set(y))) and np.allclose(P.sum(1), 1, atol=1e-5)
    assert head.W.shape == (len(set(y)), tiny_clip.dim)
    head.add_class(X[:2], "a_new_thing")
    assert head.predict_proba(X).shape[1] == len(set(y)) + 1
    head.save(tmp_path / "h.npz")
    assert np.allclose(load_head(tmp_path / "h.npz").predict_proba(X), head.predict_proba(X), atol=1e-5)
    with pytest.raises(NotSupportedError, match="text tower"):
        make_head(name).fit(X, y)


@pytest.mark.parametrize("path", ["sklearn", "torch"])
def test_linear_balanced_matches_sklearn_class_weight(digits, path):
    """Unequal label counts (as suggest leaves them): each class weighs the same, on both solver paths."""
    import torch

    from embedstore.labels.heads.linear import _fit_sklearn, _fit_torch

    X, y = digits
    rng = np.random.default_rng(0)
    sup = np.concatenate([rng.choice(np.flatnonzero(y == c), 2 + 2 * i, replace=False) for i, c in enumerate(np.unique(y)[:4])])
    classes, yi = np.unique(y[sup], return_inverse=True)
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8, class_weight="balanced").fit(X[sup], yi)
    unweighted = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(X[sup], yi)
    if path == "sklearn":
        W, b = _fit_sklearn(X[sup], yi, len(classes), 1.0, None, None, 1000, balanced=True)
    else:
        W, b = _fit_torch(X[sup], yi, len(classes), 1.0, None, None, 500, torch.device("cpu"), balanced=True)
    Z = X @ W.T + b
    assert np.allclose(Z - Z.mean(1, keepdims=True), ref.decision_function(X) - ref.decision_function(X).mean(1, keepdims=True), atol=0.05)
    # the weighting moved the boundary: smaller classes are predicted more often than without it
    assert (ref.predict(X) == 0).sum() > (unweighted.predict(X) == 0).sum()
    head = make_head("linear", C=1.0, Cs=()).fit(X[sup], list(y[sup]))
    assert head.balanced and (np.array(head.predict(X)) == classes[ref.predict(X)]).mean() >= 0.98


def test_linear_prefers_weak_regularisation_within_noise(digits):
    """C: the largest whose cross-validated accuracy is within a standard error of the best one's, never a
    smaller C than the plain CV winner."""
    X, y = digits
    for seed in range(3):
        sup, _ = split(y, 4, seed)
        h = make_head("linear").fit(X[sup], list(y[sup]))
        winner = max(h.cv_scores, key=h.cv_scores.get)
        assert set(h.cv_scores) == set(h.Cs) and h.C >= winner
        assert h.cv_scores[winner] - h.cv_scores[h.C] <= 0.5 / np.sqrt(len(sup)) + 1e-9  # a standard error is at most 0.5/sqrt(n)


def test_folds_are_not_capped_by_the_smallest_class(digits):
    """Uneven labels (what suggest gives): 5 folds even when a class has 2 labels, each label held out once,
    every class in every training part, and auto's out-of-fold predictions cover every label."""
    from embedstore.labels.heads.calibrate import make_folds

    X, y = digits
    rng = np.random.default_rng(0)
    classes = sorted(set(y))[:4]
    lab = np.concatenate([rng.choice(np.flatnonzero(y == c), 2 if c == classes[0] else 8, replace=False) for c in classes])
    folds = make_folds(list(y[lab]))
    assert len(folds) == 5
    held = np.concatenate([te for _, te in folds])
    assert sorted(held) == list(range(len(lab)))
    assert all(set(y[lab][tr]) == set(classes) for tr, _ in folds)
    assert all(len(tr) >= 0.75 * len(lab) for tr, _ in folds)  # capped at 2 folds, each part had half the labels
    h = make_head("auto").fit(X[lab], list(y[lab]), unlabeled=X)
    assert h.oof_logp.shape == (len(lab), 4) and np.isfinite(h.oof_logp).all()
    assert make_folds(["a", "a", "b"]) is None  # one label of b: nothing to hold out
