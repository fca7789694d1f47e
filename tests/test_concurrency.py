"""Several writers and readers on one store at once: two processes adding (partly the same new content),
one classifying, one labeling, one labeling with lock_timeout=0, one searching in a loop, and a UI-like
reader that opens the store fresh on every "rerun" (info, data versions, labels, predictions, search), as
the Streamlit app does.

What must hold: nobody gets anything but results or an EmbedstoreError with a one-line message (writers
with the default lock_timeout wait for each other and get none; the impatient one gets StoreLockedError
only); afterwards the store is consistent (no duplicate content, every vector/label/prediction belongs to
an image, nothing pending) and the counts are exact: every distinct image content once, the labels the
labelers' successful calls gave, a prediction per unlabeled image after one more classify.
A last test pins one interleaving deterministically (classify fitting while a label lands).

Workers are forked from one process that imported embedstore once (fast starts, real processes). The
store uses timm's test_efficientnet with seeded random weights: only counts matter here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import embedstore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKBONE = "timm:test_efficientnet"

LAUNCHER = r"""
import json, os, random, sys, time, traceback, warnings
warnings.simplefilter("ignore")
import embedstore, embedstore.ingest.ingest as ingest
from embedstore.errors import EmbedstoreError
import embedstore.labels.classify, sklearn.linear_model, timm  # noqa: F401
ingest.COMMIT_EVERY = 2  # many small commits: more interleavings

plan = json.loads(sys.argv[1])
root, done_flag = plan["root"], plan["done_flag"]

def open_store():
    return embedstore.open(root, create=False, device="cpu", lock_timeout=plan["lock_timeout"])

def attempt(rep, what, fn):
    t0 = time.monotonic()
    try:
        out = fn()
        rep["ok"] += 1
        return out
    except EmbedstoreError as e:
        rep["errors"].append({"op": what, "type": type(e).__name__, "message": str(e)})
    except Exception as e:
        rep["unexpected"].append({"op": what, "type": type(e).__name__, "traceback": traceback.format_exc()[-3000:]})
    finally:
        rep["seconds"][what] = rep["seconds"].get(what, 0) + time.monotonic() - t0

def check_hits(rep, hits, k):
    rep["hit_ids"].extend(h.id for h in hits)
    if not (len(hits) <= k and all(h.score == h.score and -1.01 <= h.score <= 1.01 for h in hits)):
        rep["unexpected"].append({"op": "search", "type": "BadHits", "traceback": repr(hits)})

def worker(w, rep):
    rng = random.Random(w["seed"])
    kind = w["kind"]
    if kind == "add":
        s = open_store()
        for folder in w["folders"]:
            attempt(rep, "add", lambda: s.add([folder], batch_size=2, workers=0, progress=False))
    elif kind == "label":
        s = embedstore.open(root, create=False, device="cpu", lock_timeout=w.get("lock_timeout", plan["lock_timeout"]))
        for k, (ids, cls) in enumerate(w["steps"]):
            if attempt(rep, "label", lambda: s.label(ids, cls)) is not None:
                rep["done_steps"].append(k)
            time.sleep(w.get("pause", 0))
    elif kind == "classify":
        s = open_store()
        for head in w["heads"]:
            attempt(rep, "classify", lambda: s.classify(head=head))
    elif kind in ("search", "ui"):
        s = open_store()
        while not os.path.exists(done_flag) or rep["ok"] < w["min_ops"]:
            if kind == "ui":  # every rerun opens the store fresh, as the Streamlit app does
                s = attempt(rep, "open", open_store) or s
                attempt(rep, "info", lambda: s.info())
                attempt(rep, "data_versions", lambda: s.data_versions())
                attempt(rep, "labels", lambda: s.labels())
                attempt(rep, "predictions", lambda: s.predictions())
            ids = attempt(rep, "vector_ids", lambda: s.vector_ids())
            if ids is not None and len(ids):
                q = int(ids[rng.randrange(len(ids))])
                hits = attempt(rep, "search_id", lambda: s.search(id=q, k=5))
                if hits is not None:
                    check_hits(rep, hits, 5)
            if kind == "search":
                img = w["images"][rng.randrange(len(w["images"]))]
                hits = attempt(rep, "search_image", lambda: s.search(image=img, k=5))
                if hits is not None:
                    check_hits(rep, hits, 5)
                hits = attempt(rep, "search_where", lambda: s.search(image=img, k=3, where="label IS NOT NULL"))
                if hits is not None:
                    check_hits(rep, hits, 3)

pids = {}
for i, w in enumerate(plan["workers"]):
    pid = os.fork()
    if pid == 0:
        rep = {"name": w["name"], "kind": w["kind"], "ok": 0, "errors": [], "unexpected": [], "hit_ids": [],
               "seconds": {}, "done_steps": []}
        try:
            worker(w, rep)
        except BaseException:
            rep["unexpected"].append({"op": "worker", "type": "crash", "traceback": traceback.format_exc()[-3000:]})
        with open(w["report"], "w") as f:
            json.dump(rep, f)
        os._exit(0)
    pids[pid] = w
writers = [p for p, w in pids.items() if w["kind"] not in ("search", "ui")]
deadline = time.monotonic() + plan["timeout"]
status = {}
while len(status) < len(writers) and time.monotonic() < deadline:
    for p in writers:
        if p not in status:
            done, st = os.waitpid(p, os.WNOHANG)
            if done:
                status[p] = st
    time.sleep(0.05)
open(done_flag, "w").close()  # readers finish their current loop and stop
for p in pids:
    if p not in status:
        while time.monotonic() < deadline:
            done, st = os.waitpid(p, os.WNOHANG)
            if done:
                status[p] = st
                break
            time.sleep(0.05)
        else:
            os.kill(p, 9)
            os.waitpid(p, 0)
            status[p] = "killed: hung"
print(json.dumps({pids[p]["name"]: str(s) for p, s in status.items()}))
"""


def write_image(path: Path, seed: int, tint: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 200, (24, 24, 3))
    if tint is not None:
        a[..., tint] += 40
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()




def run_concurrently(tmp_path: Path, weights: Path, rounds: int, base_n: int = 30, timeout: float = 240) -> None:
    rng = np.random.default_rng(rounds)
    base = tmp_path / "base"
    base.mkdir()
    for i in range(base_n):
        write_image(base / f"{i:03d}.png", i, tint=i % 3)
    s = embedstore.open(tmp_path / "conc.es", backbone=BACKBONE, weights=str(weights), device="cpu")
    s.add([base], progress=False)
    ids = sorted(s.vector_ids().tolist())
    s.label(ids[:3], "red")  # so that classify has something to fit from the start
    s.label(ids[3:6], "green")

    # two adders; the second's folders repeat some of the first's content (cross-process dedup)
    folders = {"a": [], "b": []}
    for r in range(rounds):
        for who in "ab":
            d = tmp_path / f"{who}{r}"
            d.mkdir()
            for i in range(4):
                write_image(d / f"{i}.png", 1000 + 10 * r + i if who == "a" or i < 2 else 5000 + 10 * r + i)
            folders[who].append(str(d))
    expected_hashes = {digest(p) for d in [base, *map(Path, folders["a"] + folders["b"])] for p in d.iterdir()}
    steps, final = [], {i: c for i, c in zip(ids[:6], ["red"] * 3 + ["green"] * 3)}
    for _ in range(3 * rounds):
        pick = sorted(int(i) for i in rng.choice(ids[:-6], size=4, replace=False))
        cls = str(rng.choice(["red", "green", "blue"]))
        steps.append((pick, cls))
        final.update({i: cls for i in pick})
    # an impatient labeler (lock_timeout 0) on its own images: it may get StoreLockedError, nothing else
    hasty = [([int(i) for i in rng.choice(ids[-6:], size=2, replace=False)], str(rng.choice(["red", "blue"])))
             for _ in range(4 * rounds)]
    reports = tmp_path / "reports"
    reports.mkdir()
    workers = [
        {"name": "adder-a", "kind": "add", "folders": folders["a"]},
        {"name": "adder-b", "kind": "add", "folders": folders["b"]},
        {"name": "labeler", "kind": "label", "steps": steps},
        {"name": "hasty-labeler", "kind": "label", "steps": hasty, "lock_timeout": 0, "pause": 0.3},
        {"name": "classifier", "kind": "classify", "heads": ["knn", "auto"] * rounds},
        {"name": "searcher", "kind": "search", "images": [str(p) for p in sorted(base.iterdir())], "min_ops": 5},
        {"name": "ui", "kind": "ui", "min_ops": 5},
    ]
    for k, w in enumerate(workers):
        w["seed"], w["report"] = k, str(reports / f"{w['name']}.json")
    plan = {"root": str(s.root), "done_flag": str(tmp_path / "writers-done"), "lock_timeout": 120,
            "timeout": timeout, "workers": workers}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(plan)], check=False, capture_output=True,
                          text=True, timeout=timeout + 120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v == "0" for v in status.values()), status

    reps = {w["name"]: json.loads(Path(w["report"]).read_text()) for w in workers}
    for name, rep in reps.items():
        print(f"{name}: {rep['ok']} ok, {len(rep['errors'])} errors; seconds {rep['seconds']}")
    unexpected = {n: r["unexpected"] for n, r in reps.items() if r["unexpected"]}
    assert not unexpected, "exceptions other than EmbedstoreError:\n" + "\n".join(
        f"{n}: {u['op']}: {u['type']}\n{u.get('traceback', '')}" for n, us in unexpected.items() for u in us[:2])
    for name, rep in reps.items():
        for e in rep["errors"]:
            assert e["message"].strip() and "\n" not in e["message"].strip(), e
    writer_errors = {n: r["errors"] for n, r in reps.items()
                     if r["kind"] not in ("search", "ui") and r["errors"] and n != "hasty-labeler"}
    assert not writer_errors, f"writers must wait for each other, not fail: {writer_errors}"
    for e in reps["hasty-labeler"]["errors"]:
        assert e["type"] == "StoreLockedError" and "being written by another process" in e["message"], e
    assert len(reps["hasty-labeler"]["done_steps"]) + len(reps["hasty-labeler"]["errors"]) == len(hasty)
    for k in reps["hasty-labeler"]["done_steps"]:
        final.update({i: hasty[k][1] for i in hasty[k][0]})
    assert reps["adder-a"]["ok"] == reps["adder-b"]["ok"] == rounds
    assert reps["searcher"]["ok"] >= 5 and reps["ui"]["ok"] >= 5

    # the store afterwards: consistent, exact counts
    s = embedstore.open(tmp_path / "conc.es", create=False, device="cpu")
    imgs = s.storage.read_table("images")
    image_ids = imgs.column("id").to_pylist()
    assert len(set(image_ids)) == len(image_ids)
    hashes = imgs.column("hash").to_pylist()
    assert sorted(hashes) == sorted(expected_hashes), "every distinct content exactly once"
    vs = s.vectors()
    assert sorted(vs.ids.tolist()) == sorted(image_ids), "every image exactly one vector"
    np.testing.assert_allclose(np.linalg.norm(vs.vectors, axis=1), 1.0, atol=1e-4)
    assert s.pending_images() == []
    assert s.labels() == final, "labels are the labeler's, in its order"
    preds = s.predictions().column("id").to_pylist()
    # (not: no prediction for a labeled image. A classify that read the labels before a label landed writes
    # one: see test_classify_racing_a_label_leaves_no_prediction_on_it)
    assert len(set(preds)) == len(preds) and set(preds) <= set(image_ids)
    for name in ("searcher", "ui"):
        assert set(reps[name]["hit_ids"]) <= set(image_ids)
    info = s.info()
    assert (info.images, info.vectors, info.labels) == (len(expected_hashes), len(expected_hashes), len(final))
    res = s.classify(head="knn")
    assert len(res.predictions) == len(expected_hashes) - len(final)
    assert sorted(s.predictions().column("id").to_pylist()) == sorted(set(image_ids) - set(final))


def test_writers_and_readers_at_once(tmp_path, weights):
    run_concurrently(tmp_path, weights, rounds=2)


@pytest.mark.slow
def test_writers_and_readers_at_once_long(tmp_path, weights):
    run_concurrently(tmp_path, weights, rounds=8, base_n=60, timeout=420)


CLASSIFY = """
import sys, embedstore
embedstore.open(sys.argv[1], create=False, device="cpu", lock_timeout=120).classify(head="knn")
"""


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (a writer waiting for the lock has the lock file open)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see a process wait for the lock")
def test_classify_racing_a_label_leaves_no_prediction_on_it(tmp_path, weights):
    """Deterministic: the test holds the write lock while a classify process fits (reading the labels) and then
    waits for the lock to write; meanwhile the test labels one more image and lets go."""
    base = tmp_path / "base"
    base.mkdir()
    for i in range(12):
        write_image(base / f"{i:03d}.png", i, tint=i % 3)
    s = embedstore.open(tmp_path / "race.es", backbone=BACKBONE, weights=str(weights), device="cpu")
    s.add([base], progress=False)
    ids = sorted(s.vector_ids().tolist())
    s.label(ids[:3], "red")
    s.label(ids[3:6], "green")
    lock = s.root / ".lock"
    with s.write_lock():
        proc = subprocess.Popen([sys.executable, "-c", CLASSIFY, str(s.root)], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 180
            while not holds_open(proc.pid, lock):  # it has fitted and waits to write its predictions
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "classify never reached the write lock"
                time.sleep(0.05)
            s.label([ids[6]], "blue")  # re-entrant: this handle holds the lock
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    predicted = set(s.predictions().column("id").to_pylist())
    assert ids[6] in s.labels()
    assert ids[6] not in predicted, "a labeled image carries a prediction written by a classify that started before"
