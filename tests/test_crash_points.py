"""Crash points: SIGKILL a writer at seeded random moments of add, label, classify, index rebuild and
finetune, then check what it left: the store opens, `embedstore info` works, image rows are distinct
contents (no duplicates, no half rows), every vector/label/prediction belongs to an image, the active
version is intact, and re-running the command completes with exact counts.

Children start fast: one "zygote" process imports embedstore (torch, LanceDB, FAISS, timm) once and
os.fork()s a child per trial (LanceDB resets its runtime in a forked child; the zygote itself never opens
a store). The zygote kills the child `kill_after` seconds after the fork; the moments are spread evenly
(with seeded jitter) over the time one uninterrupted run of the same command took. Stores are tiny
(tens of 24 px images) and use timm's test_efficientnet with seeded random weights: only counts matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from embedstore.cli.app import app
from PIL import Image
from typer.testing import CliRunner

import embedstore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BACKBONE = "timm:test_efficientnet"
TRIALS = {"add": 36, "label": 24, "classify": 18, "index": 18, "finetune": 6}  # 102 in all

ZYGOTE = r"""
import json, os, signal, sys, time, traceback, warnings
warnings.simplefilter("ignore")
import embedstore, embedstore.ingest.ingest as ingest
import embedstore.loop.finetune, embedstore.labels.classify, embedstore.search.faiss_index  # noqa: F401
import timm, peft, sklearn.linear_model  # noqa: F401  (imported once here, not in every child)
ingest.COMMIT_EVERY = 2  # commit often: more moments between commits

def run(spec):
    s = embedstore.open(spec["root"], create=False, device="cpu", lock_timeout=120)
    op = spec["op"]
    if op == "add":
        s.add(spec["paths"], batch_size=2, workers=0, progress=False)
    elif op == "label":
        for items, cls in spec["steps"]:
            s.label(items, cls) if cls else s.unlabel(items)
    elif op == "classify":
        s.classify(head=spec["head"])
    elif op == "index":
        for factory in spec["factories"]:
            s.build_index(factory=factory, gpu=False, progress=False)
    elif op == "finetune":
        s.finetune(progress=False, **spec["kw"])

for line in sys.stdin:
    spec = json.loads(line)
    log = open(spec["log"], "ab")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        code = 0
        try:
            run(spec)
        except BaseException:
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    log.close()
    kill_at = t0 + spec["kill_after"] if spec.get("kill_after") is not None else None
    deadline = t0 + spec.get("timeout", 300)
    killed = timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if now >= deadline or (kill_at is not None and now >= kill_at):
            os.kill(pid, signal.SIGKILL)
            killed, timed_out = True, now >= deadline
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(max(0.0, min(0.005, (kill_at or deadline) - now)))
    rc = os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": rc, "killed": killed and rc == -signal.SIGKILL, "timed_out": timed_out,
                      "seconds": time.monotonic() - t0}), flush=True)
"""


class Zygote:
    """The fork server: run(spec) forks a child that runs one command, kills it after kill_after seconds."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.log = open(logdir / "zygote.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        self.n = 0

    def run(self, spec: dict, kill_after: float | None = None) -> dict:
        self.n += 1
        log = self.logdir / f"child{self.n:04d}-{spec['op']}.log"
        self.proc.stdin.write(json.dumps({**spec, "kill_after": kill_after, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died: " + (self.logdir / "zygote.log").read_text()[-3000:]
        r = json.loads(line)
        r["log"] = log.read_text(errors="replace") if log.exists() else ""
        assert not r["timed_out"], f"{spec['op']} hung: " + r["log"][-3000:]
        assert r["rc"] in (0, -signal.SIGKILL), f"{spec['op']} failed (rc {r['rc']}): " + r["log"][-3000:]
        return r

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()




def moments(rng: np.random.Generator, n: int, span: float) -> list[float]:
    """n kill moments spread over [0, span): one per stratum, seeded jitter, shuffled."""
    m = [span * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(m)
    return m


class Trials:
    """Kill rounds of one operation: the first run of each kind (`key`) goes uninterrupted and times it; each later
    one is SIGKILLed at one of `n` seeded moments spread over that time (`results` collects those)."""

    def __init__(self, zygote, rng: np.random.Generator, n: int):
        self.zygote, self.rng, self.n = zygote, rng, n
        self.spans: dict = {}
        self.results: list[dict] = []

    def run(self, spec: dict, key=None) -> tuple[dict, bool]:
        """(the run's record, whether it was the uninterrupted timing run)."""
        if key not in self.spans:
            r = self.zygote.run(spec)
            self.spans[key] = moments(self.rng, self.n, r["seconds"])
            return r, True
        r = self.zygote.run(spec, kill_after=self.spans[key].pop())
        self.results.append(r)
        return r, False


# ---- images -----------------------------------------------------------------------------------
CLASSES = ("red", "green", "blue")


def write_image(path: Path, seed: int, cls: str | None = None) -> Path:
    """A 24 px noise image with unique content; with cls, slightly tinted by class: hard enough for the frozen
    random backbone that one epoch of LoRA beats it on the held-out labels (so a fine-tune makes a version)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 200, (24, 24, 3))
    if cls:
        a[..., CLASSES.index(cls)] += 20
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()


def make_store(root: Path, weights: Path, src: Path, n: int, seed: int, classes: bool = False):
    src.mkdir(parents=True)
    for i in range(n):
        write_image(src / f"{i:03d}.png", seed + i, CLASSES[i % 3] if classes else None)
    s = embedstore.open(root, backbone=BACKBONE, weights=str(weights), device="cpu")
    s.add([src], progress=False)
    return s


# ---- the invariants ---------------------------------------------------------------------------
def column(t, name):
    return [] if t is None else t.column(name).to_pylist()


def check_store(root: Path) -> dict:
    """What must hold after any kill. Returns the store's state (fresh reads)."""
    res = CliRunner().invoke(app, ["info", str(root), "--json"])
    assert res.exit_code == 0, f"embedstore info failed after a kill: {res.output[-2000:]}"
    info = json.loads(res.stdout)
    s = embedstore.open(root, create=False, device="cpu")
    st = s.storage
    m = json.loads((root / "manifest.json").read_text())
    active = m["active_version"]
    assert active in m["versions"], "the active version is not in the manifest"
    assert m["versions"][active].get("status") in (None, "ready"), m["versions"][active]
    assert f"vectors_{active}" in st.table_names(), "the active version lost its vectors table"

    imgs = st.read_table("images")
    ids = column(imgs, "id")
    for name in ("id", "path", "hash", "size", "added"):
        assert imgs.column(name).null_count == 0, f"images rows with a null {name} (half rows)"
    assert len(set(ids)) == len(ids), "duplicate image ids"
    assert len(set(column(imgs, "hash"))) == len(ids), "the same content stored twice"
    assert len(set(column(imgs, "path"))) == len(ids), "the same path stored twice"
    assert not ids or max(ids) < m["next_id"], "an image id beyond the reserved ones"
    known = set(ids)
    vec_ids = {}
    for v, entry in m["versions"].items():
        vi, X = st.read_vectors(v)
        vi = vi.tolist()
        assert len(set(vi)) == len(vi), f"an image embedded twice in version {v}"
        assert set(vi) <= known, f"vectors of version {v} for ids that are not images: {sorted(set(vi) - known)[:5]}"
        if len(vi):
            np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-4)
        if entry.get("status") != "embedding" and v != active:
            assert len(vi) == len(ids), f"ready version {v} has {len(vi)} vectors for {len(ids)} images"
        vec_ids[v] = set(vi)
    labels = st.read_table("labels")
    lid = column(labels, "id")
    assert len(set(lid)) == len(lid), "an image with two label rows"
    assert set(lid) <= known, "labels for images that do not exist"
    assert labels is None or labels.column("label").null_count == 0
    preds = st.read_table("predictions")
    pid = column(preds, "id")
    assert len(set(pid)) == len(pid), "an image with two prediction rows"
    assert set(pid) <= known, "predictions for images that do not exist"
    assert info["images"] == len(ids) and info["vectors"] == len(vec_ids[active]) and info["labels"] == len(lid)
    return {
        "store": s, "ids": known, "hashes": set(column(imgs, "hash")), "active": active, "vectors": vec_ids,
        "labels": dict(zip(lid, column(labels, "label"))), "predictions": set(pid), "manifest": m,
        "errors": column(st.read_table("errors"), "path"),
    }


def check_search(s, k: int = 5) -> None:
    """The index (whatever a kill left of it) answers like an exact search over the vectors."""
    vs = s.vectors()
    if len(vs.ids) < 2:
        return
    for q in (0, len(vs.ids) // 2, len(vs.ids) - 1):
        hits = s.search(id=int(vs.ids[q]), k=k)
        sims = vs.vectors @ vs.vectors[q]
        sims[q] = -np.inf
        best = np.sort(sims)[::-1][: min(k, len(vs.ids) - 1)]
        np.testing.assert_allclose([h.score for h in hits], best, atol=1e-4)


TEMP_LEFT: dict[str, set[str]] = {}


def record_temp(op: str, root: Path) -> None:
    """Note temporary files a killed writer left (index/model/manifest temps); reported by tally(). Not asserted:
    the windows between writing a temp file and renaming it are too short for a few dozen kills to hit
    reliably, and a test that fails one run in twenty helps nobody."""
    TEMP_LEFT.setdefault(op, set()).update(
        str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name and "lance" not in p.parts)


def tally(results: list[dict], op: str) -> None:
    killed = sum(r["killed"] for r in results)
    where = {}
    for r in results:
        where[r.get("moment", "?")] = where.get(r.get("moment", "?"), 0) + 1
    print(f"{op}: {len(results)} trials, {killed} killed mid-run, {sum(r['seconds'] for r in results):.1f}s in "
          f"children; what the kills left: {where}; temp files left: {sorted(TEMP_LEFT.get(op, ()))}")
    assert killed >= len(results) // 2, f"only {killed} of {len(results)} {op} trials were killed mid-run"


# ---- add --------------------------------------------------------------------------------------
def test_kill_during_add(zygote, weights, tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "base"
    s = make_store(tmp_path / "add.es", weights, base, 12, seed=0)
    root = s.root
    good = {digest(p) for p in base.iterdir()}
    n = TRIALS["add"]
    trials = Trials(zygote, rng, n)
    for t in range(n + 1):
        d = tmp_path / f"round{t:03d}"
        d.mkdir()
        for i in range(6):
            write_image(d / f"new{i}.png", 10_000 + 100 * t + i)
        shutil.copy(sorted(base.iterdir())[t % 12], d / "copy.png")  # a duplicate of stored content
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(40))
        offered = {digest(p) for p in d.iterdir() if p.name != "broken.png"}
        broken = digest(d / "broken.png")  # recorded, then dropped when it fails to decode
        spec = {"op": "add", "root": str(root), "paths": [str(d)]}
        r, _ = trials.run(spec)  # the first round runs uninterrupted: how long a whole add takes
        state = check_store(root)
        assert good <= state["hashes"] <= good | offered | {broken}, "content lost or unknown content stored"
        new = state["hashes"] - good
        embedded = len(state["vectors"][state["active"]]) - (len(state["ids"]) - len(new))
        r["moment"] = "before any row" if not new else "rows, no vector" if not embedded else (
            "some vectors" if embedded < len(new) else "all vectors")
        check_search(state["store"])
        # re-run: completes, exact counts
        s = state["store"]
        s.add([d], progress=False)
        good |= offered
        after = check_store(root)
        assert after["hashes"] == good and after["ids"] == after["vectors"][after["active"]]  # broken one gone
        assert str(d / "broken.png") in after["errors"]
        assert s.pending_images() == []
        record_temp("add", root)
    tally(trials.results, "add")


# ---- label ------------------------------------------------------------------------------------
def test_kill_during_label(zygote, weights, tmp_path):
    rng = np.random.default_rng(2)
    s = make_store(tmp_path / "label.es", weights, tmp_path / "src", 30, seed=100)
    root = s.root
    ids = sorted(s.vector_ids().tolist())
    expected: dict[int, str] = {}
    n = TRIALS["label"]
    trials = Trials(zygote, rng, n)
    for t in range(n + 1):
        steps = []
        for _ in range(8):
            pick = sorted(rng.choice(ids, size=int(rng.integers(1, 8)), replace=False).tolist())
            cls = None if rng.random() < 0.2 else str(rng.choice(["cat", "dog", "bird", "fish"]))
            steps.append((pick, cls))
        final = dict(expected)
        seen_values = {i: {expected.get(i)} for i in ids}  # a label an image may carry at any moment
        for pick, cls in steps:
            for i in pick:
                if cls:
                    final[i] = cls
                else:
                    final.pop(i, None)
                seen_values[i].add(final.get(i))
        spec = {"op": "label", "root": str(root), "steps": steps}
        r, _ = trials.run(spec)
        state = check_store(root)
        for i in ids:  # each image carries a class it had before or one a step gave it (or none, if one did)
            assert state["labels"].get(i) in seen_values[i] | {None}, (i, state["labels"].get(i), seen_values[i])
        s = state["store"]
        for pick, cls in steps:
            s.label(pick, cls) if cls else s.unlabel(pick)
        expected = final
        after = check_store(root)
        assert after["labels"] == expected, "re-running the label commands did not give the expected labels"
    tally(trials.results, "label")


# ---- classify ---------------------------------------------------------------------------------
def test_kill_during_classify(zygote, weights, tmp_path):
    rng = np.random.default_rng(3)
    s = make_store(tmp_path / "classify.es", weights, tmp_path / "src", 36, seed=200, classes=True)
    root = s.root
    vs = s.vectors()
    for c in CLASSES:
        s.label([int(i) for i, p in zip(vs.ids, vs.paths) if int(Path(p).stem) % 3 == CLASSES.index(c)][:4], c)
    unlabeled = set(vs.ids.tolist()) - set(s.labels())
    last_written: set = set()
    n = TRIALS["classify"]
    trials = Trials(zygote, rng, n // 2)
    # auto (fits and compares heads: long) and knn (mostly the write: its moments land in the write)
    for t, head in enumerate(["auto", "knn"] + ["auto", "knn"] * (n // 2)):
        spec = {"op": "classify", "root": str(root), "head": head}
        r, _ = trials.run(spec, key=head)
        state = check_store(root)
        assert state["predictions"] <= unlabeled, "a labeled image got a prediction"
        written = set(state["store"].predictions().column("time").to_pylist())
        r["moment"] = ("no predictions" if not state["predictions"] else "predictions of an earlier run"
                       if written <= last_written else "new predictions")
        assert len(written) <= 1, "predictions of two runs mixed"
        s = state["store"]
        res = s.classify(head=spec["head"])
        last_written = set(s.predictions().column("time").to_pylist())
        after = check_store(root)
        assert after["predictions"] == unlabeled and len(res.predictions) == len(unlabeled)
        assert set(s.predictions().column("label").to_pylist()) <= set(CLASSES)
    tally(trials.results, "classify")


# ---- index rebuild ----------------------------------------------------------------------------
FACTORIES = ["Flat", "HNSW16", "IVF4,Flat", "Flat", "HNSW8", "IVF2,Flat"]


def index_on_disk(root: Path, state: dict) -> str:
    """What a kill left of the index: a loadable file + sidecar, or something the next search must rebuild."""
    from embedstore.search import faiss_index as fx

    dim = state["manifest"]["versions"][state["active"]]["dim"]
    try:
        _, meta = fx.load(root / "index" / f"{state['active']}.faiss", dim)
    except fx.IndexFileError:
        return "index unusable (rebuilt)"
    return f"{meta.get('factory')} index on disk"


def test_kill_during_index_rebuild(zygote, weights, tmp_path):
    rng = np.random.default_rng(4)
    s = make_store(tmp_path / "index.es", weights, tmp_path / "src", 40, seed=300)
    root = s.root
    n = TRIALS["index"]
    trials = Trials(zygote, rng, n)
    for t in range(n + 1):
        spec = {"op": "index", "root": str(root), "factories": FACTORIES * 4}  # many saves: kills land in them
        r, _ = trials.run(spec)
        state = check_store(root)
        r["moment"] = index_on_disk(root, state)
        check_search(state["store"])  # a half-written index is detected and rebuilt, never used
        s = state["store"]
        summary = s.build_index(factory="Flat", gpu=False, progress=False)
        assert summary.vectors == 40
        fresh = embedstore.open(root, create=False, device="cpu")
        assert fresh.info().index.fresh and fresh.info().index.vectors == 40
        check_search(fresh)
        record_temp("index", root)
    tally(trials.results, "index")


# ---- finetune ---------------------------------------------------------------------------------
# one epoch; decision fold of 6 labels (min_decide lowered from 20) and a margin of -1, so the new version is
# always made and activated: the kill moments cover training, embedding the new version and the switch
FINETUNE = {"epochs": 1, "batch_size": 8, "cached_views": 1, "min_decide": 3, "decide_margin": -1.0}


def test_kill_during_finetune(zygote, weights, tmp_path):
    rng = np.random.default_rng(5)
    s = make_store(tmp_path / "ft-base.es", weights, tmp_path / "src", 30, seed=400, classes=True)
    vs = s.vectors()
    for c in CLASSES:
        s.label([int(i) for i, p in zip(vs.ids, vs.paths) if int(Path(p).stem) % 3 == CLASSES.index(c)][:8], c)
    parent = s.active_version
    n = TRIALS["finetune"]
    trials = Trials(zygote, rng, n)
    for t in range(n + 1):
        root = tmp_path / f"ft{t}.es"
        shutil.copytree(s.root, root)
        spec = {"op": "finetune", "root": str(root), "kw": FINETUNE}
        r, timing = trials.run(spec)
        if timing:
            made = check_store(root)["manifest"]
            assert made["active_version"] != parent, "the uninterrupted fine-tune activated no version: " + r["log"]
        state = check_store(root)
        m = state["manifest"]
        unfinished = [v for v, e in m["versions"].items() if e.get("status") == "embedding"]
        r["moment"] = ("new version active" if m["active_version"] != parent else
                       f"new version embedding ({len(state['vectors'][unfinished[0]])} vectors)" if unfinished else
                       "no new version yet")
        if m["active_version"] == parent:
            assert state["vectors"][parent] == state["ids"], "the old version lost vectors"
        res = state["store"].finetune(progress=False, **FINETUNE)
        after = check_store(root)
        m = after["manifest"]
        assert not [v for v, e in m["versions"].items() if e.get("status") == "embedding"], res
        assert all(after["vectors"][v] == after["ids"] for v in m["versions"]), "a version is missing vectors"
        check_search(after["store"])
        record_temp("finetune", root)
    tally(trials.results, "finetune")


# ---- a relabel is all or nothing --------------------------------------------------------------
def test_kill_never_drops_a_label_being_replaced(zygote, weights, tmp_path):
    """Relabel every image back and forth; a kill at any moment leaves each image its old or its new class."""
    rng = np.random.default_rng(6)
    s = make_store(tmp_path / "relabel.es", weights, tmp_path / "src", 30, seed=500)
    ids = sorted(s.vector_ids().tolist())
    s.label(ids, "a")
    spec = {"op": "label", "root": str(s.root), "steps": [(ids, c) for c in ["b", "a"] * 8]}
    span = zygote.run(spec)["seconds"]
    lost = []
    for when in moments(rng, 40, span):
        zygote.run(spec, kill_after=when)
        state = check_store(s.root)
        missing = [i for i in ids if i not in state["labels"]]
        if missing:
            lost.append(f"killed at {when:.3f}s: {len(missing)} of {len(ids)} images have no label")
        state["store"].label(ids, "a")
    assert not lost, lost
