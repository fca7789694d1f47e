"""The loop's rules and commands that need no training: the plateau rule on synthetic eval histories,
--if-plateau doing nothing without a plateau, version bookkeeping errors, CLI help."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.loop.plateau import PLATEAU_MARGIN, PLATEAU_WINDOW, plateau_rule
from embedstore.results import EvalRun, PlateauResult, VersionRow


def runs(*pairs):
    """Eval runs, oldest first, as eval_history() returns them: (n_labels, best_accuracy) pairs."""
    return [
        EvalRun.from_dict({"n_labels": n, "best_accuracy": a, "time": f"2024-01-01T00:00:{i:02d}"})
        for i, (n, a) in enumerate(pairs)
    ]


def test_defaults_are_documented_values():
    assert (PLATEAU_MARGIN, PLATEAU_WINDOW) == (0.01, 2)


@pytest.mark.parametrize(
    "history, plateau, gain",
    [
        (runs((10, 0.60), (20, 0.70), (30, 0.80)), False, 0.20),  # still climbing
        (runs((10, 0.60), (20, 0.80), (30, 0.805), (40, 0.809)), True, 0.009),  # flat over the last 2 additions
        (runs((10, 0.80), (20, 0.79), (30, 0.78)), True, -0.02),  # getting worse is a plateau too
        (runs((10, 0.80), (20, 0.80), (30, 0.81)), False, 0.01),  # exactly the margin: still progress
    ],
)
def test_plateau_rule(history, plateau, gain):
    r = plateau_rule(history)
    assert isinstance(r, PlateauResult)
    assert r.plateau is plateau
    assert r.gain == pytest.approx(gain, abs=1e-6)
    assert r.reason.startswith("over the last 2 label additions") and "held-out labels" in r.reason


def test_too_few_label_counts_is_no_plateau():
    r = plateau_rule(runs((10, 0.8), (20, 0.8)))
    assert r.plateau is False and r.gain is None
    assert "needs 3" in r.reason and "embedstore eval" in r.reason
    assert plateau_rule([]).plateau is False


def test_reruns_at_same_label_count_keep_the_latest():
    # three evals at 30 labels count once, with the latest accuracy
    r = plateau_rule(runs((10, 0.5), (20, 0.7), (30, 0.95), (30, 0.71), (30, 0.705)))
    assert [p["n_labels"] for p in r.points] == [10, 20, 30]
    assert r.gain == pytest.approx(0.205)
    assert r.plateau is False


def test_removed_labels_restart_the_curve():
    r = plateau_rule(runs((10, 0.5), (20, 0.5), (30, 0.5), (15, 0.6), (25, 0.6)))
    assert [p["n_labels"] for p in r.points] == [15, 25]
    assert r.plateau is False  # only 2 points since the restart


def test_margin_and_window_are_configurable():
    h = runs((10, 0.60), (20, 0.70), (30, 0.72), (40, 0.73))
    assert plateau_rule(h, margin=0.01, window=2).plateau is False  # +0.03 over 2 additions
    assert plateau_rule(h, margin=0.05, window=2).plateau is True
    assert plateau_rule(h, margin=0.02, window=1).plateau is True  # +0.01 over the last addition
    assert plateau_rule(h, margin=0.01, window=3).gain == pytest.approx(0.13)
    with pytest.raises(InvalidArgumentError):
        plateau_rule(h, window=0)


def estimated(*triples):
    """Eval runs whose unlabeled estimate is known: (n_labels, best_accuracy, estimated accuracy) triples."""
    return [
        EvalRun.from_dict({"n_labels": n, "best_accuracy": a, "time": f"2024-01-01T00:00:{i:02d}",
                           "unlabeled_estimate": None if e is None else {"accuracy": e}})
        for i, (n, a, e) in enumerate(triples)
    ]


def test_plateau_needs_the_unlabeled_estimate_to_stop_gaining_too():
    """suggest's labels get harder every round, so accuracy on held-out labels flattens (or falls) while the rest
    of the collection still improves: when both runs have eval's estimate for the unlabeled images, a plateau
    needs both readings to have gained less than the margin."""
    climbing = plateau_rule(estimated((20, 0.60, 0.60), (30, 0.61, 0.70), (40, 0.58, 0.80)))
    assert climbing.plateau is False and climbing.gain == pytest.approx(0.20)
    assert "expected accuracy on the unlabeled images +0.200 (0.600 -> 0.800)" in climbing.reason
    assert "held-out labels -0.020" in climbing.reason and climbing.reason.endswith("(a plateau needs both to gain less)")
    assert [p["estimate"] for p in climbing.points] == [0.60, 0.70, 0.80]
    flat = plateau_rule(estimated((20, 0.80, 0.80), (30, 0.80, 0.805), (40, 0.805, 0.806)))
    assert flat.plateau is True and flat.gain == pytest.approx(0.006)
    rising_labels = plateau_rule(estimated((20, 0.5, 0.80), (30, 0.7, 0.805), (40, 0.9, 0.806)))
    assert rising_labels.plateau is False  # held-out accuracy still climbing
    # an older run without an estimate: the held-out accuracy alone decides
    mixed = plateau_rule(estimated((20, 0.60, None), (30, 0.61, 0.70), (40, 0.60, 0.80)))
    assert mixed.plateau is True and "unlabeled" not in mixed.reason


def test_runs_without_accuracy_are_ignored():
    h = runs((10, 0.6), (20, 0.7), (30, 0.705)) + [EvalRun.from_dict({"n_labels": 40, "best_accuracy": None})]
    assert len(plateau_rule(h).points) == 3


# ---- on a real store (no training) --------------------------------------------------------------
def test_if_plateau_without_plateau_does_nothing(digits_store):
    s = digits_store
    before = json.loads((s.root / "manifest.json").read_text())
    r = s.finetune(if_plateau=True, progress=False)
    assert r.status == "skipped" and r.version is None
    assert "no plateau" in r.message and "label count" in r.message
    assert json.loads((s.root / "manifest.json").read_text()) == before
    assert not (s.root / "models").exists() or not any((s.root / "models").iterdir())


def test_if_plateau_cli_says_why(digits_store):
    res = CliRunner().invoke(app, ["finetune", str(digits_store.root), "--if-plateau", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["status"] == "skipped" and d["plateau"]["plateau"] is False


def test_version_errors(digits_store):
    s = digits_store
    with pytest.raises(InvalidArgumentError, match="unknown version 'nope'"):
        s.use("nope")
    with pytest.raises(InvalidArgumentError, match="is active"):
        s.prune(s.active_version)
    with pytest.raises(InvalidArgumentError, match="unknown fine-tune method"):
        s.finetune(method="dora", progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown fine-tune option"):
        s.finetune(progress=False, learning_rate=1)
    with pytest.raises(EmptyInputError, match="no labeled images"):
        s.finetune(progress=False)
    res = CliRunner().invoke(app, ["use", str(s.root), "nope"])
    assert res.exit_code == 2 and "unknown version" in res.output and "Traceback" not in res.output


def test_versions_of_a_new_store(digits_store):
    rows = digits_store.versions()
    assert len(rows) == 1
    r = rows[0]
    assert r.active and r.parent is None and r.status == "ready"
    assert r.vectors == digits_store.count_images()
    assert isinstance(r, VersionRow) and set(r.to_dict()) >= {"version", "active", "created", "parent", "eval_accuracy"}
    assert digits_store.info().finetuned_versions == 0


@pytest.mark.parametrize("cmd", ["finetune", "versions", "use", "prune"])
def test_commands_have_help(cmd):
    res = CliRunner().invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and len(res.output) > 100


# ---- the activation decision (loop/decide.py): given vectors / correctness, no training ------------------
def _clusters(seed=0, n_cls=10, per=16, dim=32, noise=1.1):
    import numpy as np

    rng = np.random.default_rng(seed)
    C = rng.normal(size=(n_cls, dim))
    y = np.repeat([f"c{k}" for k in range(n_cls)], per)
    X = C[np.repeat(np.arange(n_cls), per)] + noise * rng.normal(size=(n_cls * per, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype("float32"), y


def _loo_centroid_accuracy(X, y):
    """What a check on the trained images would see: leave-one-out nearest centroid among them."""
    import numpy as np

    hits = 0
    for i in range(len(y)):
        m = np.arange(len(y)) != i
        cls = sorted(set(y[m]))
        C = np.stack([X[m][y[m] == c].mean(0) for c in cls])
        hits += cls[int(np.argmax(C @ X[i]))] == y[i]
    return hits / len(y)


def test_memorising_fine_tune_is_not_activated():
    """A 'fine-tune' that moves only the images it trained on onto perfect class codes looks flawless on
    those images, but the decision uses labels it never saw: no gain there, so it is not activated."""
    import numpy as np

    from embedstore.loop.decide import decide, head_correctness, paired_comparison
    from embedstore.loop.finetune import split_holdout

    X_old, y = _clusters()
    ids = list(range(len(y)))
    seen, dec = split_holdout(ids, list(y), 0.25, seed=1)
    X_new = X_old.copy()
    codes = {c: np.eye(X_old.shape[1])[k] for k, c in enumerate(sorted(set(y)))}
    X_new[seen] = np.stack([codes[y[i]] for i in seen])  # memorised: the trained images, and only those, move
    assert _loo_centroid_accuracy(X_new[seen], y[seen]) == 1.0 > _loo_centroid_accuracy(X_old[seen], y[seen])
    old = head_correctness(X_old[seen], y[seen], X_old[dec], y[dec])
    new = head_correctness(X_new[seen], y[seen], X_new[dec], y[dec])
    cmp = paired_comparison(old, new, margin=0.0)
    assert cmp["n"] == len(dec) == 40 and cmp["low"] <= cmp["estimate"] <= cmp["high"]
    activate, why = decide(cmp, None, 0.1, len(dec), 20)
    assert not cmp["better"] and not activate
    assert "not better on labels it never saw" in why and "80% interval" in why


def test_real_gain_on_unseen_labels_is_activated_and_margin_counts():
    import numpy as np

    from embedstore.loop.decide import decide, paired_comparison

    rng = np.random.default_rng(0)
    old = {"linear": rng.random(60) < 0.6, "knn": rng.random(60) < 0.5}
    new = {"linear": old["linear"] | (rng.random(60) < 0.6), "knn": old["knn"].copy()}  # strictly more right
    cmp = paired_comparison(old, new)
    assert cmp["estimate"] > 0.15 and cmp["low"] > 0 and cmp["better"]
    assert cmp["new"]["head"] == "linear" and set(cmp["old"]["heads"]) == {"linear", "knn"}
    assert decide(cmp, None, 0.1, 60, 20)[0]
    strict = paired_comparison(old, new, margin=cmp["high"] + 0.01)  # a margin above the whole interval
    assert not strict["better"] and not decide(strict, None, 0.1, 60, 20)[0]
    # a small gain on few images: the interval reaches below 0, not activated
    tiny_new = {k: v.copy() for k, v in old.items()}
    tiny_new["linear"][np.flatnonzero(~old["linear"])[:1]] = True  # one more image right
    small = paired_comparison(old, tiny_new)
    assert small["estimate"] > 0 and small["low"] <= 0 and not small["better"]


def test_too_few_decision_labels_refuse_and_forgetting_refuses():
    import numpy as np

    from embedstore.loop.decide import decide, labels_needed, paired_comparison

    ok, why = decide(None, None, 0.1, 10, 20)
    assert not ok and "too few labels to decide: 10 decision labels, at least 20" in why
    old = {"linear": np.zeros(40, bool)}
    cmp = paired_comparison(old, {"linear": np.ones(40, bool)})
    forget = {"k": 5, "recall_old": 0.95, "recall_new": 0.70, "drop": 0.25}
    ok, why = decide(cmp, forget, 0.10, 40, 20)
    assert not ok and "search on the other images degrades" in why and "0.950 -> 0.700" in why
    assert decide(cmp, forget, 0.30, 40, 20)[0]  # the threshold is the override
    assert labels_needed(10, 0.25, 20) == 6  # round(0.25 * 6) = 2 per class
    assert labels_needed(2, 0.25, 20) == 38


def test_too_few_labels_to_decide_trains_nothing(digits_store):
    s = digits_store
    ids, paths, _ = s.vectors()
    by = {}
    for i, p in zip(ids, paths):
        by.setdefault(p.split("/")[-2], []).append(int(i))
    for c, members in by.items():
        s.label(members[:4], c)  # 4 per class: 10 decision labels < 20
    before = json.loads((s.root / "manifest.json").read_text())
    r = s.finetune(progress=False)
    assert r.status == "too-few-labels" and r.version is None and not r.activated
    assert "too few labels to decide" in r.message and "label about 6 images per class" in r.message
    assert json.loads((s.root / "manifest.json").read_text()) == before
    res = CliRunner().invoke(app, ["finetune", str(s.root), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["status"] == "too-few-labels" and "Nothing trained" in d["message"]
    res = CliRunner().invoke(app, ["finetune", str(s.root)])
    assert res.exit_code == 0 and "too-few-labels" in res.output and "Traceback" not in res.output


def test_forgetting_measure_sees_lost_near_duplicates(photo_store_path):
    """recall@k of altered views: the same backbone keeps it; a version whose store vectors no longer sit
    where its backbone puts the views (here: each image's vector swapped with another's) loses it, which
    warns and refuses activation even when the labels say better."""
    import numpy as np

    import embedstore
    from embedstore.ingest.backbones import load_backbone
    from embedstore.loop.decide import decide, paired_comparison
    from embedstore.loop.forgetting import forgetting_warning, near_duplicate_recall

    s = embedstore.open(photo_store_path, create=False)
    vs = s.vectors()
    bb = load_backbone("offline:efficientnet_lite0")
    same = near_duplicate_recall(bb, bb, vs.ids, list(vs.paths), vs.vectors, vs.vectors, set(), n=8, seed=0)
    assert same["n"] == 8 and same["drop"] == 0 and same["recall_old"] >= 0.75 and same["neighbour_overlap"] == 1.0
    assert forgetting_warning(same) is None
    swapped = vs.vectors[np.roll(np.arange(len(vs.ids)), 40)]
    f = near_duplicate_recall(bb, bb, vs.ids, list(vs.paths), vs.vectors, swapped, set(), n=8, seed=0)
    assert f["recall_new"] < 0.3 and f["drop"] > 0.5
    assert "dropped" in forgetting_warning(f)
    cmp = paired_comparison({"linear": np.zeros(40, bool)}, {"linear": np.ones(40, bool)})
    ok, why = decide(cmp, f, 0.10, 40, 20)
    assert not ok and "degrades" in why
    labeled = {int(i) for i in vs.ids[:77]}  # labeled images are never sampled
    assert near_duplicate_recall(bb, bb, vs.ids, list(vs.paths), vs.vectors, vs.vectors, labeled, n=8)["n"] == 3


def _label_digits(store, per_class):
    by_cls = {}
    vs = store.vectors()
    for i, p in zip(vs.ids, vs.paths):
        by_cls.setdefault(p.split("/")[-2], []).append(int(i))
    for c, ids in sorted(by_cls.items()):
        store.label(ids[:per_class], c)
    return by_cls


def test_auto_never_judges_heads_on_images_a_fine_tune_trained_on(digits_store):
    """After a fine-tune, the labels its backbone trained on look easier than they are: auto fits on them but
    scores candidates (and calibrates) only on the others, and says so; with too few others it does not choose."""
    _label_digits(digits_store, 6)
    labeled = sorted(digits_store.labels())
    st = digits_store.storage
    for trained, expect in ((labeled[:40], "scored on the 20 label(s)"), (labeled[:55], "default ensemble")):
        with st.write_lock():
            st.version_info()["finetune"] = {"trained_ids": trained, "selection_ids": []}
            st.write_manifest()
        res = digits_store.classify(head="auto", persist=False)
        assert expect in res.reason, res.reason
        h, vs, lab, _ = digits_store.fit_head("auto")
        scored = h.score_mask
        assert scored is not None and int(scored.sum()) == len(labeled) - len(trained)
        assert not scored[np.isin(vs.ids[lab], trained)].any()
    with st.write_lock():  # no fine-tune record: every label scores
        del st.version_info()["finetune"]
        st.write_manifest()
    h, *_ = digits_store.fit_head("auto")
    assert h.score_mask is None and "never trained" not in digits_store.classify(persist=False).reason


def test_pseudo_labels_are_confident_unlabeled_images_within_each_class_quota(digits_store):
    """Self-training's pseudo-labels: only images without any label (never the decision fold's), at most
    per_label x the class's training labels, more accurate than the head on all unlabeled images, and a higher
    threshold keeps a subset; threshold 0 is off."""
    from embedstore.loop.pseudo import make_pool, pseudo_labels

    by_cls = _label_digits(digits_store, 6)
    truth = {i: c for c, ids in by_cls.items() for i in ids}
    labels = digits_store.labels()
    train = {i: c for c, ids in by_cls.items() for i in ids[:4]}  # ids[4:6] stand for the decision fold
    st, cl, v = digits_store.storage, digits_store.classifying, digits_store.active_version
    lab = st.vectors(v, ids=sorted(train))

    def run(threshold):
        return pseudo_labels(cl, make_pool(cl, st, v, lab, train, threshold, 2.0))

    items, summary = run(0.5)
    assert items and summary["kept"] == len(items) and summary["candidates"] == len(truth) - len(labels)
    assert not {i for i, _, _ in items} & set(labels)
    per_class = {}
    for _, _, c in items:
        per_class[c] = per_class.get(c, 0) + 1
    assert max(per_class.values()) <= 8 and per_class == summary["per_class"]
    acc = np.mean([truth[i] == c for i, _, c in items])
    everything = digits_store.classify(head="auto", persist=False)
    acc_all = np.mean([truth[p.id] == p.label for p in everything.predictions])
    assert acc > acc_all, (acc, acc_all)
    stricter, _ = run(0.8)
    assert set(stricter) < set(items)  # the same greedy order: the confident end of the lenient list
    off, why = run(0.0)
    assert off == [] and why["reason"] == "off"


def test_best_head_gain_with_auto_worse_is_not_activated():
    """The backbone's best head improves on the decision labels, but auto (what classify uses) loses there:
    the user would get a worse classifier, so the version is kept and the reason says auto."""
    from embedstore.loop.decide import decide, paired_comparison

    rng = np.random.default_rng(1)
    old = {"linear": rng.random(60) < 0.6, "auto": rng.random(60) < 0.8}
    new = {"linear": old["linear"] | (rng.random(60) < 0.6), "auto": old["auto"].copy()}
    new["auto"][np.flatnonzero(old["auto"])[:3]] = False  # three images auto got right, now wrong
    cmp = paired_comparison(old, new)
    assert cmp["low"] > 0 and cmp["auto"]["estimate"] == -0.05 and not cmp["better"]
    ok, why = decide(cmp, None, 0.1, 60, 20)
    assert not ok and "auto, what classify uses, gets worse" in why and "-0.050" in why
    new["auto"] = old["auto"].copy()  # auto unchanged: the best-head gain decides
    ok, why = decide(paired_comparison(old, new), None, 0.1, 60, 20)
    assert ok and "auto 0." in why


def test_a_further_self_training_round_relabels_the_same_candidates_with_the_trained_model(digits_store):
    """pseudo_rounds > 1: the candidates are embedded by the model the last round trained (here the untouched
    one, so its vectors equal the store's) and auto is never scored on labels that model trained on."""
    import copy

    from embedstore.loop.pseudo import make_pool, relabel

    by_cls = _label_digits(digits_store, 6)
    truth = {i: c for c, ids in by_cls.items() for i in ids}
    train = {i: c for c, ids in by_cls.items() for i in ids[:4]}
    st, cl, v = digits_store.storage, digits_store.classifying, digits_store.active_version
    bb = digits_store.backbone_for(v)
    model = copy.deepcopy(bb.image_model)
    pool = make_pool(cl, st, v, st.vectors(v, ids=sorted(train)), train, 0.5, 2.0)
    items, summary = relabel(pool, bb, model)
    cand = set(pool.cand.ids.tolist())
    assert len(cand) == len(truth) - len(digits_store.labels()) == summary["candidates"]  # every unlabeled image
    assert items and {i for i, _, _ in items} <= cand
    assert max(summary["per_class"].values()) <= 8 and summary["kept"] == len(items)
    assert np.mean([truth[i] == c for i, _, c in items]) > 0.8
    assert next(model.parameters()).device.type == "cpu"


def test_flips_are_left_out_for_digits_and_kept_for_photos(digits_store, photo_store):
    """flip=None decides from the labels: a mirrored digit is less recognisable than the digit (flips would
    teach the backbone that a mirrored 2 is a 2), a mirrored photo view is as recognisable as the view."""
    from embedstore.loop.flip_check import check_flip

    def items(store, per_class):
        vs = store.vectors()
        seen, out = {}, []
        for i, p in zip(vs.ids, vs.paths):
            c = p.split("/")[-2]
            if seen.get(c, 0) < per_class:
                seen[c] = seen.get(c, 0) + 1
                out.append((int(i), p, c))
        return out, {int(i): x for i, x in zip(vs.ids, vs.vectors)}

    d = check_flip(digits_store.backbone_for(digits_store.active_version), *items(digits_store, 12))
    assert d["flip"] is False and d["n"] == 120 and d["accuracy"] - d["mirrored"] > 0.02 and "left out" in d["reason"]
    p = check_flip(photo_store.backbone_for(photo_store.active_version), *items(photo_store, 5))
    assert p["flip"] is True and p["n"] == 40 and p["accuracy"] - p["mirrored"] <= 0.02 and "kept" in p["reason"]
    one, vec = items(photo_store, 1)  # one label per class: nothing to leave out, the usual default
    assert check_flip(photo_store.backbone_for(photo_store.active_version), one, vec)["flip"] is True
