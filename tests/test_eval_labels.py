"""evaluate: seeded few-shot episodes over the labels, stored runs, history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.labels.evaluate import estimate_unlabeled
from embedstore.labels.heads import make_head
from embedstore.labels.suggest import rank
from embedstore.results import EvalRun


def test_evaluate_stores_runs(photo_store, photo_dir):
    photo_store.label_folders(photo_dir)  # 10 per class: shots 1..8
    run = photo_store.evaluate(shots=(1, 2, 4, 8, 16), episodes=3, heads=["knn", "centroid"])
    assert isinstance(run, EvalRun)
    assert run.shots == [1, 2, 4, 8]  # 16 needs 17 labels per class
    assert set(run.heads) == {"knn", "centroid"}
    for h, curve in run.heads.items():
        assert set(curve) == {"1", "2", "4", "8"}
        assert all(0 <= v["mean"] <= 1 and v["episodes"] == 3 for v in curve.values())
        assert curve["8"]["mean"] >= 0.9
    assert run.best_head in ("knn", "centroid") and run.best_shots == 8
    assert run.n_labels == 80 and run.n_classes == 8
    again = photo_store.evaluate(shots=(1, 2), episodes=3, heads=["knn", "centroid"])
    assert again.heads["knn"]["1"] == run.heads["knn"]["1"]  # seeded
    hist = photo_store.eval_history()
    assert all(isinstance(h, EvalRun) for h in hist)
    assert [h.run_id for h in hist] == [run.run_id, again.run_id]
    assert hist[0].best_head == run.best_head and hist[0].heads == run.heads
    assert hist[0].version == photo_store.active_version and hist[0].n_labels == 80
    assert photo_store.eval_history(version="other") == []


def test_evaluate_needs_enough_labels(photo_store, photo_labels):
    paths = sorted(photo_labels)
    with pytest.raises(EmptyInputError, match="no labeled"):
        photo_store.evaluate(heads=["knn"])
    photo_store.label(paths[:3], photo_labels[paths[0]])
    photo_store.label(paths[-1:], photo_labels[paths[-1]])
    with pytest.raises(EmptyInputError, match="at least 2"):
        photo_store.evaluate(heads=["knn"])
    with pytest.raises(InvalidArgumentError, match="unknown head"):
        photo_store.evaluate(heads=["nope"])
    photo_store.label(paths[-2:], photo_labels[paths[-1]])  # 2 classes, 5 labels: a curve, too few to hold out
    run = photo_store.evaluate(shots=(1,), episodes=1, heads=["knn"])
    assert run.unlabeled_estimate is None
    assert run.estimate_line().startswith("no estimate for the unlabeled images yet") and "10 in all" in run.estimate_line()


def test_episodes_test_only_on_scored_labels():
    """`scored` (evaluate: the labels a fine-tuned backbone did not train on) limits the queries, not the supports."""
    from embedstore.labels.evaluate import run_episodes

    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(c, 1.0, (10, 16)) for c in (0.0, 1.5, 3.0)]).astype(np.float32)
    y = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    scored = np.array([c != "c" for c in y])
    res = run_episodes(X, y, make_head, ["centroid"], shots=(1, 2), episodes=3, scored=scored)
    m = np.array(res["confusions"]["centroid"])  # at 2 shots, rows: true a, b, c
    assert res["shots"] == [1, 2] and m[2].sum() == 0  # c trains the heads but is never a query
    assert m[:2].sum() == 3 * (20 - 2 * 2)  # every scored label not drawn as a support, in each of 3 episodes
    full = run_episodes(X, y, make_head, ["centroid"], shots=(1, 2), episodes=3)
    assert np.array(full["confusions"]["centroid"]).sum() == 3 * (30 - 3 * 2)


def test_eval_run_stores_a_confusion_matrix_of_the_best_head(photo_store, photo_labels):
    by_class = {}
    for p, c in sorted(photo_labels.items()):
        by_class.setdefault(c, []).append(p)
    for c, ps in list(by_class.items())[:3]:
        photo_store.label(ps[:4], c)
    run = photo_store.evaluate(shots=(1, 2), episodes=2, heads=["centroid", "knn"])
    conf = run.confusion
    assert conf["head"] == run.best_head and conf["shots"] == 2
    M = conf["matrix"]
    assert len(M) == len(conf["classes"]) == 3 and all(len(r) == 3 for r in M)
    # 2 episodes x (4 - 2) query images per class: every row sums to 4
    assert [sum(r) for r in M] == [4, 4, 4]
    stored = photo_store.eval_history()[-1]
    assert stored.confusion["matrix"] == M


def test_estimate_on_suggested_labels_is_honest(digits_store_path):
    """eval's estimate of the unlabeled accuracy when suggest chose half the labels (hard, atypical images): it
    is the calibrated confidence, its stderr counts the gap to the weighted out-of-fold accuracy, its interval
    holds the truth."""
    vs = embedstore.open(digits_store_path, create=False).vectors()
    X, y = vs.vectors, np.array([Path(p).parent.name for p in vs.paths], dtype=object)
    classes = sorted(set(y))
    errs = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        lab = [int(i) for c in classes for i in rng.choice(np.flatnonzero(y == c), 2, replace=False)]
        for _ in range(2):
            unl = np.setdiff1d(np.arange(len(y)), lab)
            lab += [int(unl[p["row"]]) for p in rank(X[lab], list(y[lab]), X[unl], len(classes), make_head)]
        unl = np.setdiff1d(np.arange(len(y)), lab)
        h = make_head("auto").fit(X[lab], list(y[lab]), unlabeled=X[unl])
        truth = float((np.array(h.predict(X[unl]), dtype=object) == y[unl]).mean())
        est = estimate_unlabeled(X[lab], list(y[lab]), X[unl], make_head)
        assert abs(est["accuracy"] - est["mean_confidence"]) < 1e-3
        assert est["stderr"] >= abs(est["mean_confidence"] - est["weighted"]) / 2 - 1e-3
        assert est["low"] <= truth <= est["high"], (est, truth)
        errs.append(est["accuracy"] - truth)
    # a 200-image store on a steep learning curve: errors can be large, but each is inside its interval (above)
    assert abs(np.mean(errs)) < 0.2, errs


def test_weighted_temperature_follows_the_weighted_labels():
    """fit_temperature with weights: the rows that stand for more of the collection set the temperature."""
    from embedstore.labels.heads.calibrate import fit_temperature

    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 3, n)
    Z = rng.normal(size=(n, 3))
    easy = np.arange(n) < n // 2
    Z[easy, y[easy]] += 4.0  # confidently right
    hard = ~easy
    Z[hard, (y[hard] + 1) % 3] += 1.0  # unsure and mostly wrong
    t_all = fit_temperature(Z, y)
    assert fit_temperature(Z, y, weights=np.ones(n)) == pytest.approx(t_all, rel=1e-3)
    t_easy = fit_temperature(Z, y, weights=np.where(easy, 10.0, 1.0))
    t_hard = fit_temperature(Z, y, weights=np.where(easy, 1.0, 10.0))
    assert t_easy < t_all < t_hard
