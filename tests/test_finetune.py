"""A real fine-tune on CPU: packaged EfficientNet-Lite0 on scikit-learn digits (out of its ImageNet domain).

One module-scoped run does the expensive part once: label 10 digits per class, start `finetune` in a
subprocess, SIGKILL it while it re-embeds, check the old version is still active, rerun (`embedstore
finetune --json`) to finish. The tests then check what that run left: the decision and its explanation,
accuracy, counts, versions, rollback, search, info.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import embedstore
from embedstore.cli.app import app
from embedstore.loop.finetune import FinetuneConfig, split_holdout, tail_names
from embedstore.results import FinetuneResult

slow = pytest.mark.slow  # the module-scoped fine-tune takes minutes on 2 CPU cores

SHOTS = 10
TRAIN = {"epochs": 4, "holdout": 0.3}  # per class: 2 decision labels (25%), then 2 selection + 6 train

CHILD = """
import sys, embedstore, embedstore.ingest.ingest as ing
ing.COMMIT_EVERY = 16  # commit often so the kill lands between commits
embedstore.open(sys.argv[1], create=False).finetune(progress=False, epochs={epochs}, holdout={holdout})
"""


def unlabeled_centroid_accuracy(store, version, labels, truth):
    ids, _, X = store.vectors(version)
    lab = np.array([int(i) in labels for i in ids])
    classes = sorted(set(labels.values()))
    y = np.array([labels[int(i)] for i in ids[lab]])
    C = np.stack([X[lab][y == c].mean(0) for c in classes])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    pred = np.array(classes)[(X[~lab] @ C.T).argmax(1)]
    return float(np.mean(pred == np.array([truth[int(i)] for i in ids[~lab]])))


def vector_count(root, version):
    import lancedb

    db = lancedb.connect(str(root / "lance"))
    name = f"vectors_{version}"
    names = db.list_tables()
    names = list(getattr(names, "tables", names))
    return db.open_table(name).count_rows() if name in names else 0


@pytest.fixture(scope="module")
def run(digits_store_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune") / "digits.es"
    shutil.copytree(digits_store_path, root)
    s = embedstore.open(root, create=False)
    ids, paths, _ = s.vectors()
    truth = {int(i): os.path.basename(os.path.dirname(p)) for i, p in zip(ids, paths)}
    for c in sorted(set(truth.values())):
        s.label([i for i in sorted(truth) if truth[i] == c][:SHOTS], c)
    labels = s.labels()
    old = s.active_version
    n_images = s.count_images()

    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(**TRAIN), str(root)])
    partial, new, deadline = 0, None, time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        m = json.loads((root / "manifest.json").read_text())
        new = next((v for v, e in m["versions"].items() if e.get("status") == "embedding"), None)
        if new and (partial := vector_count(root, new)) > 0:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    after_kill = json.loads((root / "manifest.json").read_text())

    # the CLI finds the unfinished version and completes it
    res = CliRunner().invoke(app, ["finetune", str(root), "--json"])
    assert res.exit_code == 0, res.output
    result = FinetuneResult(**json.loads(res.stdout))
    s = embedstore.open(root, create=False)
    return {
        "root": root, "store": s, "old": old, "new": new, "partial": partial, "killed": proc.returncode,
        "after_kill": after_kill, "result": result, "labels": labels, "truth": truth, "n_images": n_images,
    }


@slow
def test_kill_during_reembedding_leaves_old_version_active(run):
    assert run["killed"] == -signal.SIGKILL
    assert run["new"] is not None and 0 < run["partial"] < run["n_images"]
    m = run["after_kill"]
    assert m["active_version"] == run["old"]
    assert m["versions"][run["new"]]["status"] == "embedding"
    assert vector_count(run["root"], run["old"]) == run["n_images"]  # old version intact


@slow
def test_rerun_finishes_the_job(run):
    r = run["result"]
    assert isinstance(r, FinetuneResult)
    assert r.resumed is True and r.version == run["new"]
    assert r.reembedded == run["n_images"] - run["partial"]  # only what the killed run had not committed
    assert r.vectors == r.images == run["n_images"]  # every image re-embedded exactly once
    assert run["store"].versions()[-1].status == "ready"


@slow
def test_decision_uses_unseen_labels_and_explains_itself(run):
    s, r = run["store"], run["result"]
    before = unlabeled_centroid_accuracy(s, run["old"], run["labels"], run["truth"])
    after = unlabeled_centroid_accuracy(s, run["new"], run["labels"], run["truth"])
    print(f"unlabeled accuracy frozen {before:.3f} -> fine-tuned {after:.3f}; decision {r.decision}; {r.forgetting}")
    d, f = r.decision, r.forgetting
    assert {"estimate", "low", "high", "se", "margin", "n", "old", "new", "compared", "reason", "activate"} <= set(d)
    assert d["n"] == 20 and d["low"] <= d["estimate"] <= d["high"] and "decision labels neither saw" in d["compared"]
    assert f["n"] > 0 and 0 <= f["recall_new"] <= 1 and f["drop"] == pytest.approx(f["recall_old"] - f["recall_new"], abs=1e-3)
    auto_ok = d["auto"] is None or d["auto"]["estimate"] >= 0  # what classify uses must not get worse
    assert r.activated == (d["low"] > d["margin"] and auto_ok and f["drop"] <= d["max_forgetting"])
    assert (s.active_version == run["new"]) == r.activated and r.status == ("activated" if r.activated else "kept")
    assert d["reason"] in r.message
    # the decision labels were never trained or selected on; the manifest and the record say which were
    e = s.version_info(run["new"])["finetune"]
    side = json.loads((run["root"] / "models" / f"{run['new']}.json").read_text())
    assert len(e["decision_ids"]) == 20 and not set(e["decision_ids"]) & (set(e["trained_ids"]) | set(e["selection_ids"]))
    assert set(map(int, side["train"])) == set(e["trained_ids"]) and set(map(int, side["decision"])) == set(e["decision_ids"])
    assert set(e["trained_ids"]) | set(e["selection_ids"]) | set(e["decision_ids"]) == set(run["labels"])
    # self-training (on by default): pseudo-labels only on images nobody labeled, recorded with their class
    p = r.train["pseudo"]
    assert e["n_pseudo"] == len(e["pseudo_ids"]) == p["kept"] > 0 and not set(e["pseudo_ids"]) & set(run["labels"])
    assert set(map(int, side["pseudo_labels"])) == set(e["pseudo_ids"]) and p["threshold"] == 0.9
    assert np.mean([run["truth"][int(i)] == c for i, c in side["pseudo_labels"].items()]) > 0.8
    assert r.train["flip"]["flip"] is False and "mirror images" in r.train["flip"]["reason"]  # digits: no flips


@slow
def test_weights_live_in_the_store_and_load_as_weights(run):
    e = run["store"].version_info(run["new"])
    assert e["weights"] == f"models/{run['new']}.pt" and e["parent"] == run["old"]
    from embedstore.ingest.backbones import load_backbone

    bb = load_backbone(e["name"], weights=str(run["root"] / e["weights"]))
    assert bb.version == run["new"]


@slow
def test_labels_never_change(run):
    assert run["store"].labels() == run["labels"]


@slow
def test_versions_json(run):
    res = CliRunner().invoke(app, ["versions", str(run["root"]), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    by = {r["version"]: r for r in rows}
    assert set(by) == {run["old"], run["new"]}
    for r in rows:
        assert {"version", "active", "created", "parent", "eval_accuracy"} <= set(r)
    assert [r["version"] for r in rows if r["active"]] == [run["store"].active_version]
    assert by[run["new"]]["parent"] == run["old"] and by[run["old"]]["parent"] is None
    assert by[run["new"]]["holdout_accuracy"] is not None


@slow
def test_use_rolls_back_and_old_version_is_searchable(run):
    s, root = run["store"], run["root"]
    res = CliRunner().invoke(app, ["use", str(root), run["old"][:6], "--json"])  # a unique prefix works
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["version"] == run["old"]
    s = embedstore.open(root, create=False)
    assert s.active_version == run["old"]
    qid = next(iter(run["labels"]))
    hits = s.search(id=qid, k=5)
    assert len(hits) == 5 and qid not in [h.id for h in hits]
    X = s.vectors().vectors
    np.testing.assert_allclose(hits[0].score, float(np.max(np.delete(X @ X[qid], qid))), atol=1e-4)
    info = s.info()
    assert info.version == run["old"] and info.vectors == run["n_images"]
    assert s.use(run["new"]).embedded == 0  # and forward again, nothing to embed
    s = embedstore.open(root, create=False)
    assert s.info().version == run["new"] and s.info().vectors == run["n_images"]
    assert len(s.search(id=qid, k=3)) == 3


@slow
def test_eval_on_the_fine_tuned_version_tests_only_labels_it_did_not_train_on(run):
    s = embedstore.open(run["root"], create=False)
    s.use(run["new"])
    e = s.version_info(run["new"])["finetune"]
    unseen = set(run["labels"]) - set(e["trained_ids"]) - set(e["selection_ids"])
    assert unseen == set(e["decision_ids"]) and len(unseen) == 20
    ev = s.evaluate(shots=(1, 2, 4), episodes=2, heads=["centroid"], save=False)
    assert ev.n_labels == 100 and ev.n_scored == 20 and "tested on the 20 the fine-tuned backbone" in ev.tested_on()
    # 2 decision labels per class, so every 4-shot episode tests on the 0-2 per class its supports left
    assert sum(map(sum, ev.confusion["matrix"])) <= 2 * 20
    est = ev.unlabeled_estimate
    assert est is not None and est["n_effective"] <= 20
    # without the decision labels nothing is left to test on: a one-line error, exit 2, labels kept
    decision = {i: run["labels"][i] for i in unseen}
    s.unlabel(sorted(decision))
    try:
        res = CliRunner().invoke(app, ["eval", str(run["root"]), "--episodes", "1"])
        assert res.exit_code == 2 and "trained on all 80 labeled images" in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    finally:
        for c in sorted(set(decision.values())):
            s.label([i for i, k in decision.items() if k == c], c)
    assert s.labels() == run["labels"]


@slow
def test_images_added_later_are_embedded_on_use(run, digits_dir, tmp_path):
    from PIL import Image

    s = run["store"]
    extra = tmp_path / "extra.png"
    Image.open(next(digits_dir.rglob("*.png"))).rotate(90).save(extra)
    s.add([extra], progress=False)  # embedded by the active (new) version only
    assert s.use(run["old"]).embedded == 1
    assert s.use(run["new"]).embedded == 0
    run["n_images"] += 1


@slow
def test_prune_removes_an_inactive_version(run):
    s = embedstore.open(run["root"], create=False)
    assert s.active_version == run["new"]
    d = s.prune(run["old"])
    assert d.pruned == run["old"]
    assert [v.version for v in s.versions()] == [run["new"]]
    assert vector_count(run["root"], run["old"]) == 0
    assert s.search(id=next(iter(run["labels"])), k=2)


# ---- pieces, no training --------------------------------------------------------------------
def test_split_holdout_is_stratified():
    ids = list(range(30))
    y = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    tr, ho = split_holdout(ids, y, 0.3)
    assert sorted(tr + ho) == ids and not set(tr) & set(ho)
    assert [sum(1 for i in ho if y[i] == c) for c in "abc"] == [3, 3, 3]
    assert split_holdout(ids, y, 0.3) == (tr, ho)  # seeded


def test_tail_names_pick_the_last_blocks():
    import timm

    m = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    params, modules = tail_names(m, 1)
    assert params[0].startswith("blocks.6.") and "conv_head.weight" in params
    assert not any(p.startswith("blocks.5.") for p in params)
    assert tail_names(m, 2)[0][0].startswith("blocks.5.")


def test_bad_config():
    from embedstore.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="holdout"):
        FinetuneConfig(holdout=0.95).check()


def test_split_frozen_prefix_matches_the_whole_model():
    import timm
    import torch

    from embedstore.loop.finetune import split_frozen_prefix

    torch.manual_seed(0)
    m = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    prefix, tail = split_frozen_prefix(m, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tail(prefix(x)), m(x))
    assert split_frozen_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1) is None


def test_exported_weights_load_as_weights_into_the_same_backbone(tmp_path, digits_dir):
    import torch

    from embedstore.ingest.backbones import load_backbone
    from embedstore.loop.finetune import export_state_dict

    bb = load_backbone("offline:efficientnet_lite0")
    f = tmp_path / "same.pt"
    torch.save(export_state_dict(bb, bb.image_model), f)
    again = load_backbone("offline:efficientnet_lite0", weights=str(f))
    assert again.version != bb.version and again.describe()["weights_id"].startswith("sha256:")
    img = [str(next(digits_dir.rglob("*.png")))]
    np.testing.assert_allclose(again.embed_images(img), bb.embed_images(img), atol=1e-5)
