"""Labels, classify, explain on real features (packaged EfficientNet-Lite0 on photo views and digits)."""

from __future__ import annotations

import csv
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError
from embedstore.results import Neighbor, Prediction


def by_class(labels: dict[str, str]) -> dict[str, list[str]]:
    out = defaultdict(list)
    for p, c in sorted(labels.items()):
        out[c].append(p)
    return out


def label_first(store, photo_labels, k=3) -> dict[str, str]:
    """Label the first k images of each class; returns {path: class} of the rest (the truth to predict)."""
    rest = {}
    for c, paths in by_class(photo_labels).items():
        store.label(paths[:k], c)
        rest.update({p: c for p in paths[k:]})
    return rest


# ---- labels ---------------------------------------------------------------------------------------
def test_label_paths_relative_ids_and_folder(photo_store, photo_dir, photo_labels, monkeypatch):
    groups = by_class(photo_labels)
    res = photo_store.label(groups["chelsea"][:2], "cat")
    assert res.labeled == 2 and res.new_class and res.unknown_count == 0
    monkeypatch.chdir(photo_dir)
    rel = str(Path(groups["horse"][0]).relative_to(photo_dir))  # relative to cwd
    res = photo_store.label([rel, "rocket"], "misc")  # a file and a folder
    assert res.labeled == 1 + len(groups["rocket"])
    ids = photo_store.resolve_items([groups["coffee"][0]])[0]
    photo_store.label(ids, "coffee")  # by id
    labels = photo_store.labels()
    assert sorted(set(labels.values())) == photo_store.classes() == ["cat", "coffee", "misc"]
    assert len(labels) == 2 + 1 + len(groups["rocket"]) + 1
    t = photo_store.labels_table()
    assert set(t.column_names) >= {"id", "label", "source", "time", "path"}
    assert set(t.column("source").to_pylist()) == {"human"}
    assert photo_store.info().labels == len(labels)


def test_unknown_paths_reported_not_dropped(photo_store, photo_labels, tmp_path):
    known = next(iter(photo_labels))
    res = photo_store.label([known, str(tmp_path / "nope.jpg"), 10_000], "x")
    assert res.labeled == 1
    assert res.unknown_count == 2 and str(tmp_path / "nope.jpg") in res.unknown and "10000" in res.unknown
    with pytest.raises(InvalidArgumentError, match="none of the 1 item"):
        photo_store.label([str(tmp_path / "nope.jpg")], "x")


def test_copy_of_stored_image_is_found_by_content(photo_store, photo_labels, tmp_path):
    src = next(iter(photo_labels))
    dst = tmp_path / "elsewhere.jpg"
    shutil.copy(src, dst)
    ids, unknown = photo_store.resolve_items([dst])
    assert not unknown and photo_store.paths_for(ids) == [src]


def test_label_csv_relative_to_csv_folder(photo_store, photo_labels, tmp_path, monkeypatch):
    csv_path = tmp_path / "sub" / "labels.csv"  # relative paths resolve against the CSV's folder
    csv_path.parent.mkdir()
    rows = [(os.path.relpath(p, csv_path.parent), c) for p, c in list(photo_labels.items())[::4]]
    rows[0] = (list(photo_labels)[0], rows[0][1])  # and absolute ones work too
    rows.append(("missing/ghost.jpg", "ghost"))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    monkeypatch.chdir(tmp_path)  # not the CSV's folder: must not matter
    res = photo_store.label_csv(csv_path)
    assert res.labeled == len(rows) - 1
    assert res.unknown == ["missing/ghost.jpg"] and res.unknown_count == 1
    assert "ghost" not in photo_store.classes()
    truth = {p: c for p, c in photo_labels.items()}
    got = photo_store.labels()
    paths = photo_store.paths_for(list(got))
    assert all(truth[p] == got[i] for i, p in zip(got, paths))


def test_label_csv_bad_header(photo_store, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("file,class\na.jpg,x\n")
    with pytest.raises(InvalidArgumentError, match="path,label"):
        photo_store.label_csv(f)


def test_label_folders_imagefolder_layout(photo_store, photo_dir, photo_labels, tmp_path):
    root = tmp_path / "labeled"
    (root / "cat").mkdir(parents=True)
    chelsea = by_class(photo_labels)["chelsea"][:3]
    for p in chelsea:  # copies of stored images: found by content
        shutil.copy(p, root / "cat" / Path(p).name)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "cat" / "not_in_store.png")
    res = photo_store.label_folders(root)
    assert res.per_class == {"cat": 3}
    assert res.unknown_count == 1 and res.unknown[0].endswith("not_in_store.png")
    res = photo_store.label_folders(photo_dir)  # the fixture folder itself is class/file
    assert res.labeled == len(photo_labels) and res.unknown_count == 0
    assert res.relabeled == 3  # cat -> chelsea
    assert photo_store.classes() == sorted(set(photo_labels.values()))


def test_relabel_and_unlabel(photo_store, photo_labels):
    groups = by_class(photo_labels)
    photo_store.label(groups["horse"][:4], "animal")
    res = photo_store.label(groups["horse"][:2], "horse")
    assert res.relabeled == 2 and res.new_class
    assert photo_store.class_counts() == {"animal": 2, "horse": 2}
    assert len(photo_store.labels_table()) == 4  # one row per image, not a history
    assert photo_store.unlabel([groups["horse"][0]]).unlabeled == 1
    assert photo_store.unlabel(cls="animal").unlabeled == 2
    assert photo_store.classes() == ["horse"]
    with pytest.raises(InvalidArgumentError, match="no class 'animal'"):
        photo_store.unlabel(cls="animal")
    with pytest.raises(InvalidArgumentError, match="bad class name"):
        photo_store.label(groups["horse"][:1], "a/b")


def test_model_source_labels(photo_store, photo_labels):
    groups = by_class(photo_labels)
    photo_store.label(groups["horse"][:2], "horse", source="model")
    assert photo_store.labels() == {} and len(photo_store.labels(source=None)) == 2
    with pytest.raises(InvalidArgumentError, match="source"):
        photo_store.label(groups["horse"][:2], "horse", source="robot")


# ---- classify ----------------------------------------------------------------------------------
def test_classify_needs_labels_and_two_classes(photo_store, photo_labels):
    with pytest.raises(EmptyInputError, match="no labeled images"):
        photo_store.classify(head="knn")
    photo_store.label(by_class(photo_labels)["horse"][:2], "horse")
    with pytest.raises(EmptyInputError, match="one class"):
        photo_store.classify(head="knn")


@pytest.mark.parametrize("head", ["knn", "centroid"])
def test_classify_photo_views_few_labels(photo_store, photo_labels, head):
    rest = label_first(photo_store, photo_labels, k=3)
    res = photo_store.classify(head=head)
    preds = res.predictions
    assert len(preds) == len(rest) == 56
    for p in preds:
        assert isinstance(p, Prediction)
        assert set(p.to_dict()) == {"id", "path", "label", "confidence", "head", "probability", "explain"}
        assert p.explain is None  # not asked for
        assert 0.0 <= p.confidence <= 1.0 and p.head == res.chosen
        assert 0.0 <= p.probability <= 1.0 and p.confidence <= p.probability + 1e-4  # probability x familiarity
    acc = np.mean([rest[p.path] == p.label for p in preds])
    assert acc >= 0.9  # chance is 1/8
    assert set(res.per_class) == set(photo_labels.values())
    assert sum(d.count for d in res.per_class.values()) + res.unknown == len(preds)
    # persisted, and a second run replaces the rows
    t = photo_store.predictions()
    assert t.num_rows == len(preds) and set(t.column("version").to_pylist()) == {photo_store.active_version}
    photo_store.classify(head=head)
    assert photo_store.predictions().num_rows == len(preds)
    # labeling a predicted image drops its prediction
    photo_store.label([preds[0].path], preds[0].label)
    assert photo_store.predictions().num_rows == len(preds) - 1


def test_classify_digits_above_chance(digits_store, digits_dir):
    labels = {str(p.resolve()): p.parent.name for p in digits_dir.rglob("*.png")}
    rest = {}
    for c, paths in by_class(labels).items():
        digits_store.label(paths[:5], c)
        rest.update({p: c for p in paths[5:]})
    res = digits_store.classify(head="knn")
    acc = np.mean([rest[p.path] == p.label for p in res.predictions])
    assert acc >= 0.5  # chance is 0.1


def test_new_class_predictable_at_once(photo_store, photo_labels):
    groups = by_class(photo_labels)
    old = ["astronaut", "chelsea", "coffee", "horse"]
    for c in old:
        photo_store.label(groups[c][:3], c)
    res = photo_store.classify(head="knn")
    assert "rocket" not in res.classes
    photo_store.label(groups["rocket"][:2], "rocket")  # a new class: two examples, no retraining step
    for head in ("knn", "centroid"):
        res = photo_store.classify(head=head)
        got = {p.path: p.label for p in res.predictions}
        assert "rocket" in res.classes
        assert np.mean([got[p] == "rocket" for p in groups["rocket"][2:]]) >= 0.75


def test_abstain_on_out_of_set_images(photo_store, photo_labels, digits_dir):
    label_first(photo_store, photo_labels, k=3)
    digits = sorted(digits_dir.rglob("*.png"))[::10]  # 20 images of none of the classes
    photo_store.add(digits, progress=False)
    # confidence = calibrated probability x familiarity: images of none of the classes fall far below
    # (measured: every digit under 0.2); in-set photos with 3 labels per class mostly stay above 0.6
    res = photo_store.classify(head="knn", threshold=0.6)
    is_digit = {p.path: "/digits" in p.path for p in res.predictions}
    dig = [p.label for p in res.predictions if is_digit[p.path]]
    pho = [p.label for p in res.predictions if not is_digit[p.path]]
    assert len(dig) == 20
    assert np.mean([x is None for x in dig]) >= 0.8
    assert np.mean([x is not None for x in pho]) >= 0.9
    assert res.unknown == sum(x is None for x in dig + pho)
    rows = {r["id"]: r["label"] for r in photo_store.predictions().to_pylist()}
    assert sum(v is None for v in rows.values()) == res.unknown  # unknown persisted as null
    with pytest.raises(InvalidArgumentError, match="threshold"):
        photo_store.classify(head="knn", threshold=1.5)


def test_threshold_has_one_meaning_in_classify_and_head_predict(photo_store, photo_labels, digits_dir):
    """threshold compares with the reported confidence (calibrated top probability x familiarity), in
    classify and in Head.predict alike: unknown exactly where confidence < threshold."""
    label_first(photo_store, photo_labels, k=3)
    photo_store.add(sorted(digits_dir.rglob("*.png"))[::20], progress=False)  # 10 out-of-set images: low confidence
    base = photo_store.classify(head="centroid")  # no threshold: every image gets a class
    assert base.threshold is None and base.unknown == 0 and all(p.label is not None for p in base.predictions)
    conf = sorted({p.confidence for p in base.predictions})
    assert len(conf) >= 10
    # thresholds midway between reported confidences, so the 4-decimal rounding of `confidence` cannot matter
    ts = [round((conf[i] + conf[i + 1]) / 2, 6) for i in (len(conf) // 4, len(conf) // 2, 3 * len(conf) // 4)]
    head, vs, lab, unl = photo_store.fit_head(head="centroid")
    X, ids = vs.vectors[unl], vs.ids[unl].tolist()
    for t in ts:
        res = photo_store.classify(head="centroid", threshold=t)
        assert res.threshold == t and len(res.predictions) == len(base.predictions) == len(ids)
        by_id = {p.id: p for p in res.predictions}
        assert set(by_id) == set(ids)
        unknown = {p.id for p in res.predictions if p.label is None}
        low = {p.id for p in res.predictions if p.confidence < t}
        assert unknown == low and 0 < len(unknown) < len(ids)
        assert res.unknown == len(unknown)
        for p in res.predictions:  # known ones keep the class they get without a threshold
            if p.label is not None:
                assert p.label == next(q.label for q in base.predictions if q.id == p.id)
        # the same head, fitted by fit_head, predicts the same labels with the same threshold
        got = head.predict(X, threshold=t)
        assert got == [by_id[i].label for i in ids]
        np.testing.assert_allclose(head.decide(X, t)[1], [by_id[i].confidence for i in ids], atol=1e-4)


def test_text_heads_need_text_backbone(photo_store, photo_labels):
    label_first(photo_store, photo_labels, k=1)
    with pytest.raises(NotSupportedError, match="text tower"):
        photo_store.classify(head="zeroshot")


# ---- explain -------------------------------------------------------------------------------------
def test_explain_and_classify_explain(photo_store, photo_labels):
    rest = label_first(photo_store, photo_labels, k=3)
    res = photo_store.classify(head="knn", explain=True)
    p = res.predictions[0]
    assert len(p.explain["neighbors"]) == 3 and "prompt_scores" not in p.explain
    assert all(isinstance(e, Neighbor) and e.similarity is not None and e.label is not None for e in p.explain["neighbors"])
    path = next(iter(rest))
    ex = photo_store.explain(path, k=5)
    assert ex.path == path and ex.label is None and ex.prompt_scores is None
    sims = [n.similarity for n in ex.neighbors]
    assert len(sims) == 5 and sims == sorted(sims, reverse=True)
    assert ex.neighbors[0].label == rest[path]
    assert max(ex.class_similarity, key=lambda c: ex.class_similarity[c]["centroid"]) == rest[path]
    assert ex.prediction["label"] == rest[path]
    # a labeled image is not its own evidence
    lab_id = next(iter(photo_store.labels()))
    assert all(n.id != lab_id for n in photo_store.explain(lab_id).neighbors)
    with pytest.raises(InvalidArgumentError, match="not in the store"):
        photo_store.explain(10_000)


def test_classify_auto_says_what_it_chose(photo_store, photo_labels):
    rest = label_first(photo_store, photo_labels, k=3)
    res = photo_store.classify()  # head="auto"
    assert res.head == "auto" and res.chosen not in ("", "auto")
    assert {p.head for p in res.predictions} == {res.chosen}
    assert np.mean([rest[p.path] == p.label for p in res.predictions]) >= 0.9


@pytest.mark.slow  # builds a CLIP model (~20 s on 2 busy cores)
def test_clip_backbone_text_heads_and_prompt_scores(tmp_path, photo_labels):
    import embedstore
    from conftest import TINY_CLIP  # random weights: only the text path and shapes matter here

    g = by_class(photo_labels)
    store = embedstore.open(tmp_path / "clip.es", backbone=TINY_CLIP, device="cpu")
    store.add(g["horse"][:3] + g["rocket"][:3], progress=False)
    store.label(g["horse"][:2], "horse")
    store.label(g["rocket"][:2], "rocket")
    res = store.classify(head="zeroshot", explain=True)
    assert len(res.predictions) == 2
    ps = res.predictions[0].explain["prompt_scores"]
    assert set(ps) == {"horse", "rocket"} and all(-1 <= v <= 1 for v in ps.values())
    ex = store.explain(g["horse"][2])
    assert set(ex.prompt_scores) == {"horse", "rocket"}
    assert abs(sum(v["probability"] for v in ex.prompt_scores.values()) - 1) < 1e-3
