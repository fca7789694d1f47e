"""Few-shot quality beyond accuracy (issue 12): 1-shot calibration, what suggest picks, eval's estimate of the
unlabeled accuracy, a new class not stealing from old ones, shots validation. Real EfficientNet-Lite0 vectors
of the conftest digit store (200 images, 10 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.errors import InvalidArgumentError
from embedstore.labels.evaluate import estimate_unlabeled, run_episodes
from embedstore.labels.heads import make_head
from embedstore.labels.suggest import rank


@pytest.fixture(scope="module")
def digits(digits_store_path):
    _, paths, X = embedstore.open(digits_store_path, create=False).vectors()
    return X, np.array([Path(p).parent.name for p in paths], dtype=object)


def stratified(y, shots, seed, classes=None):
    rng = np.random.default_rng(seed)
    classes = sorted(set(y)) if classes is None else classes
    return np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes])


def auto_accuracy(X, y, lab, keep=None):
    """auto fitted on rows `lab`: its accuracy on the other rows (of classes `keep`, when given)."""
    unl = np.setdiff1d(np.arange(len(y)), lab)
    h = make_head("auto").fit(X[lab], list(y[lab]), unlabeled=X[unl])
    pred = np.array(h.predict(X[unl]), dtype=object)
    m = np.ones(len(unl), bool) if keep is None else np.isin(y[unl], keep)
    return float((pred[m] == y[unl][m]).mean()), h, unl


def test_one_shot_confidence_tracks_accuracy(digits):
    """With one label per class nothing can be held out; auto calibrates on its members' agreement over the
    unlabeled images. Here before: mean top probability 0.86 where accuracy was 0.54 (gap 0.33); now gap ~0.17."""
    X, y = digits
    gaps = []
    for seed in range(3):
        acc, h, unl = auto_accuracy(X, y, stratified(y, 1, seed))
        top = float(h.predict_proba(X[unl]).max(1).mean())
        assert top > 1 / len(h.classes) + 0.05, "calibration collapsed to uniform"
        gaps.append(top - acc)
    assert abs(np.mean(gaps)) < 0.25, gaps


def test_suggest_beats_random_labels(digits):
    """From one label per class, two rounds of `suggest` (10 each) teach auto more than 3 random per class."""
    X, y = digits
    classes = sorted(set(y))
    got, rand = [], []
    for seed in range(2):
        lab = list(stratified(y, 1, seed))
        for _ in range(2):
            unl = np.setdiff1d(np.arange(len(y)), lab)
            lab += [int(unl[p["row"]]) for p in rank(X[lab], list(y[lab]), X[unl], len(classes), make_head)]
        assert len(set(lab)) == 3 * len(classes)
        got.append(auto_accuracy(X, y, np.array(lab))[0])
        rand.append(auto_accuracy(X, y, stratified(y, 3, 100 + seed))[0])
    assert np.mean(got) >= np.mean(rand), (got, rand)


def test_estimate_tracks_unlabeled_accuracy(digits):
    X, y = digits
    errs = []
    for seed in range(2):
        lab = stratified(y, 4, seed)
        acc, _, unl = auto_accuracy(X, y, lab)
        est = estimate_unlabeled(X[lab], list(y[lab]), X[unl], make_head)
        assert 0 < est["stderr"] < 0.2 and est["low"] <= est["accuracy"] <= est["high"]
        errs.append(est["accuracy"] - acc)
    assert abs(np.mean(errs)) < 0.1, errs
    one = stratified(y, 1, 0)
    assert estimate_unlabeled(X[one], list(y[one]), X, make_head) is None  # nothing to hold out


def test_new_class_does_not_steal_from_old_ones(digits):
    """Old-class accuracy on the unlabeled images before and after a class is added from 3 examples."""
    X, y = digits
    old = [c for c in sorted(set(y)) if c != "9"]
    drops = []
    for seed in range(2):
        lab = stratified(y, 5, seed, old)
        before = auto_accuracy(X, y, lab, keep=old)[0]
        new = np.random.default_rng(seed).choice(np.flatnonzero(y == "9"), 3, replace=False)
        after = auto_accuracy(X, y, np.concatenate([lab, new]), keep=old)[0]
        drops.append(before - after)
    assert np.mean(drops) < 0.03, drops


def test_shots_out_of_range_is_one_clear_error(digits):
    X, y = digits
    for shots in ((0,), (0, 2), (30,)):
        with pytest.raises(InvalidArgumentError, match=r"shots must be between 1 and 19 .*got"):
            run_episodes(X, y, make_head, ["centroid"], shots=shots, episodes=1)
    assert run_episodes(X, y, make_head, ["centroid"], shots=(2, 30), episodes=1)["shots"] == [2]


def test_evaluate_reports_unlabeled_estimate(photo_store, photo_dir):
    photo_store.label_folders(photo_dir)
    run = photo_store.evaluate(shots=(1, 2), episodes=1, heads=["centroid"])
    est = run.unlabeled_estimate
    assert est is not None and 0 <= est["low"] <= est["accuracy"] <= est["high"] <= 1
    assert run.to_dict()["unlabeled_estimate"] == est


def test_estimate_weighs_only_scored_labels(digits):
    X, y = digits
    lab = np.concatenate([np.flatnonzero(y == c)[:6] for c in np.unique(y)])
    unl = np.setdiff1d(np.arange(len(y)), lab)
    mask = np.arange(len(lab)) % 3 != 0  # a third "trained on": they train the heads, never test them
    est = estimate_unlabeled(X[lab], list(y[lab]), X[unl], make_head, "auto", score_mask=mask)
    h = make_head("auto")
    h.score_mask = mask
    h.fit(X[lab], list(y[lab]), unlabeled=X[unl])
    assert est["unweighted"] == round(float(np.mean(h.oof_correct[mask])), 4)
    assert est["n_effective"] <= mask.sum()
    few = np.zeros(len(lab), bool)
    few[:9] = True  # fewer than auto's MIN_SCORED labels to test on: no estimate
    assert estimate_unlabeled(X[lab], list(y[lab]), X[unl], make_head, "auto", score_mask=few) is None


def test_auto_keeps_its_default_when_the_evidence_is_thin(digits):
    """Shrinkage toward the default ensemble: with 2 labels per class a cross-validated winner must beat it by
    more than a standard error of the paired difference; the reason is stated (and survives save/load)."""
    from embedstore.labels.choice import describe_choice

    X, y = digits
    lab = stratified(y, 2, 0)
    unl = np.setdiff1d(np.arange(len(y)), lab)
    plain = make_head("auto", margin=0.0).fit(X[lab], list(y[lab]), unlabeled=X[unl])
    top = max(v["accuracy"] for v in plain.cv_scores.values())
    assert plain.cv_scores[plain.chosen.replace(" + ", "+")]["accuracy"] == top  # margin 0: the CV winner
    strict = make_head("auto", margin=1e9).fit(X[lab], list(y[lab]), unlabeled=X[unl])
    assert strict.chosen == "propagate+cl2n + linear"
    if plain.chosen != strict.chosen:
        assert strict.default_kept and strict.note.endswith("so the default is kept")
        assert describe_choice(strict, "auto", len(lab)).startswith("auto used its default propagate+cl2n + linear")
    h = make_head("auto").fit(X[lab], list(y[lab]), unlabeled=X[unl])
    if h.default_kept:
        assert "so the default is kept" in describe_choice(h, "auto", len(lab))
    else:
        assert h.chosen != "propagate+cl2n + linear" and "best cross-validated" in describe_choice(h, "auto", len(lab))


def test_auto_leaves_a_poor_default_when_the_evidence_is_clear(tmp_path):
    """Two classes whose means coincide (A near +-e1, B near +-e2): a nearest-centroid default is at chance and
    the cross-validated winner replaces it; kept state survives save/load."""
    from embedstore.labels.heads import load_head

    rng = np.random.default_rng(0)
    D, n = 16, 120
    E = np.eye(D, dtype=np.float32)
    sign = rng.choice([-1.0, 1.0], size=(2 * n, 1)).astype(np.float32)
    base = np.vstack([E[[0] * n], E[[1] * n]]) * sign
    X = base + 0.15 * rng.standard_normal((2 * n, D)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.array(["A"] * n + ["B"] * n, dtype=object)
    lab = np.concatenate([rng.choice(n, 20, replace=False), n + rng.choice(n, 20, replace=False)])
    unl = np.setdiff1d(np.arange(2 * n), lab)
    h = make_head("auto", fallback=("centroid",)).fit(X[lab], list(y[lab]), unlabeled=X[unl])
    assert h.chosen != "centroid" and not h.default_kept
    assert (np.array(h.predict(X[unl]), dtype=object) == y[unl]).mean() > 0.9
    kept = make_head("auto", fallback=("centroid",), margin=1e9).fit(X[lab], list(y[lab]), unlabeled=X[unl])
    assert kept.chosen == "centroid" and kept.default_kept
    kept.save(tmp_path / "h.npz")
    back = load_head(tmp_path / "h.npz")
    assert back.default_kept and back.note == kept.note and back.margin == 1e9


def test_estimate_flags_labels_chosen_for_being_hard(digits):
    """suggest picks boundary images: held out, they are predicted with much less confidence than the unlabeled
    images (the estimate then tends to read low, and says so); random labels are not flagged."""
    X, y = digits
    k = len(set(y))
    chosen = list(stratified(y, 1, 0))
    while len(chosen) < 8 * k:
        unl = np.setdiff1d(np.arange(len(y)), chosen)
        chosen += [int(unl[p["row"]]) for p in rank(X[chosen], list(y[chosen]), X[unl], k, make_head)]
    est = {}
    for kind, lab in (("random", stratified(y, 8, 0)), ("suggest", np.array(chosen))):
        unl = np.setdiff1d(np.arange(len(y)), lab)
        est[kind] = estimate_unlabeled(X[lab], list(y[lab]), X[unl], make_head)
    gap = {kind: e["mean_confidence"] - e["labels_confidence"] for kind, e in est.items()}
    assert not est["random"]["harder_labels"] and abs(gap["random"]) < 0.1
    assert est["suggest"]["harder_labels"] and gap["suggest"] > 0.15
