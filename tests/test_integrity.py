"""Integrity (issue 13: items 3, 4, 5, integrity, format version): damaged manifests, read-only stores,
index files damaged in place, `embedstore check [--repair]`, the store format and its migration.

Real store directories, real FAISS files, real permissions: the read-only tests run the CLI in a process
that cannot write the store (its own user when not root; as root: user nobody, or root without the
capabilities that let it ignore file permissions)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import embedstore
from embedstore import manifest as mf
from embedstore.cli.app import app
from embedstore.clock import now
from embedstore.errors import CorruptStoreError, StoreFormatError
from embedstore.search import faiss_index as fx
from embedstore.storage import vectors_table_name

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (what "nothing changed" means)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def store_dir(photo_store_path, tmp_path) -> Path:
    dst = tmp_path / "s.es"
    shutil.copytree(photo_store_path, dst)
    return dst


def exact_neighbours(store, qid: int, k: int):
    ids, _, X = store.vectors()
    s = X @ X[list(ids).index(qid)]
    order = [i for i in np.argsort(-s, kind="stable") if ids[i] != qid][:k]
    return [int(ids[i]) for i in order], s[order]


# ---- 3: damaged manifests ------------------------------------------------------------------------
DAMAGE = {
    "truncated": lambda t: t[: len(t) // 2],
    "empty": lambda t: "",
    "empty-object": lambda t: "{}",
    "list": lambda t: "[]",
    "unknown-active": lambda t: json.dumps({**json.loads(t), "active_version": "deadbeef0000"}),
    "missing-keys": lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "versions"}),
    "deleted": None,
}
EXPECT = {"truncated": "truncated or invalid JSON", "empty": "empty", "empty-object": "empty JSON object",
          "list": "JSON list", "unknown-active": "'deadbeef0000' is not one of its versions", "missing-keys": "missing keys: versions",
          "deleted": "the file is missing"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_manifest_is_one_line_error_and_nothing_is_deleted(store_dir, photo_dir, damage):
    man = store_dir / "manifest.json"
    man.unlink() if DAMAGE[damage] is None else man.write_text(DAMAGE[damage](man.read_text()))
    before = tree_digest(store_dir)
    for args in (("info",), ("search", "--id", 3), ("add", photo_dir), ("labels",), ("versions",), ("duplicates",)):
        one_line_error(invoke(args[0], store_dir, *args[1:]), f"{man} is unreadable", EXPECT[damage],
                       f"embedstore check {store_dir} --repair")
    with pytest.raises(CorruptStoreError):
        embedstore.open(store_dir, create=False)
    assert tree_digest(store_dir) == before


def test_check_repair_restores_a_damaged_manifest_from_its_backup(store_dir):
    s = embedstore.open(store_dir, create=False)
    s.label([0, 1], "a")
    good = json.loads((store_dir / "manifest.json").read_text())
    (store_dir / "manifest.json").write_text("")
    res = invoke("check", store_dir)
    assert res.exit_code == 1 and "manifest-unreadable" in res.stdout and "--repair" in res.stdout
    res = invoke("check", store_dir, "--repair", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["ok"] and d["repaired"] == 1 and d["findings"][0]["code"] == "manifest-unreadable"
    assert json.loads((store_dir / "manifest.json").read_text()) == good
    s2 = embedstore.open(store_dir, create=False)
    assert s2.count_images() == 80 and s2.labels() == {0: "a", 1: "a"}


def test_check_without_a_usable_copy_says_what_to_do(store_dir):
    (store_dir / "manifest.json").write_text("[]")
    (store_dir / mf.BACKUP).unlink(missing_ok=True)
    before = tree_digest(store_dir)
    res = invoke("check", store_dir, "--repair")
    assert res.exit_code == 1
    assert "no usable copy" in res.stdout and "from your own backup" in res.stdout and "untouched" in res.stdout
    assert tree_digest(store_dir) == before


# ---- format version ------------------------------------------------------------------------------
def test_newer_store_format_is_refused(store_dir):
    man = store_dir / "manifest.json"
    man.write_text(json.dumps({**json.loads(man.read_text()), "schema_version": mf.FORMAT + 1}))
    one_line_error(invoke("info", store_dir), "made by a newer embedstore", "upgrade embedstore")
    with pytest.raises(StoreFormatError):
        embedstore.open(store_dir, create=False)


def make_format_1(root: Path) -> None:
    """Turn a store into what embedstore wrote before format 2: manifest schema_version 1 (no backup file),
    index sidecars of format 1 (size, no checksum)."""
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "schema_version": 1}, indent=2))
    (root / mf.BACKUP).unlink(missing_ok=True)
    for side in (root / "index").glob("*.json"):
        meta = json.loads(side.read_text())
        meta.pop("faiss_sha256")
        side.write_text(json.dumps({**meta, "format": 1}, indent=1))


def test_format_1_store_is_migrated_on_open_and_keeps_its_data(store_dir):
    s = embedstore.open(store_dir, create=False)
    s.label([0, 1, 2], "a")
    hits = [(h.id, h.score) for h in s.search(id=5, k=5)]  # builds and saves the index
    side = store_dir / "index" / f"{s.active_version}.json"
    built = json.loads(side.read_text())["built"]
    make_format_1(store_dir)
    assert mf.upgrade(store_dir, {"schema_version": 1}, write_files=False)["schema_version"] == mf.FORMAT

    s2 = embedstore.open(store_dir, create=False)
    on_disk = json.loads((store_dir / "manifest.json").read_text())
    assert on_disk["schema_version"] == mf.FORMAT == s2.manifest["schema_version"]
    meta = json.loads(side.read_text())  # the sidecar got its checksum; the index was kept, not rebuilt
    assert meta["format"] == fx.FORMAT and meta["built"] == built and len(meta["faiss_sha256"]) == 64
    fx.load(side.with_suffix(".faiss"), s2.version_info()["dim"])
    assert [(h.id, h.score) for h in s2.search(id=5, k=5)] == hits
    assert s2.count_images() == 80 and s2.labels() == {0: "a", 1: "a", 2: "a"} and len(s2.vectors()) == 80
    assert (store_dir / mf.BACKUP).is_file() and s2.check().ok


# ---- 5: an index file damaged in place -------------------------------------------------------------
def test_index_damaged_in_place_with_its_size_kept_is_detected_and_rebuilt(store_dir):
    s = embedstore.open(store_dir, create=False)
    s.build_index(progress=False)
    path = store_dir / "index" / f"{s.active_version}.faiss"
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = b"\x7e" * 4096  # floats of ~8e37 inside the stored vectors
    path.write_bytes(bytes(raw))
    q = s.vectors(ids=[3]).vectors
    assert fx.faiss.read_index(str(path)).search(q, 5)[0].max() > 1.0001  # what FAISS alone returns now

    fresh = embedstore.open(store_dir, create=False)  # a new process's view: first load checks the sha256
    hits = fresh.search(id=3, k=10)
    want_ids, want_scores = exact_neighbours(fresh, 3, 10)
    assert [h.id for h in hits] == want_ids and max(h.score for h in hits) <= 1.0001
    np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
    _, meta = fx.load(path, fresh.version_info()["dim"])  # rebuilt and saved, valid again
    assert "sha256" in meta["problem"] and meta["n"] == 80
    dups = fresh.duplicates(threshold=0.95)
    assert all(d.score <= 1.0001 for d in dups) and len(dups) < 10


# ---- embedstore check -------------------------------------------------------------------------------
def damage_store(root: Path, sleeper_pid: int) -> dict:
    """Every kind of damage check repairs, made with the storage core as an interrupted run would leave it."""
    s = embedstore.open(root, create=False)
    s.label([0, 1, 2, 3], "a")
    s.build_index(progress=False)
    st = s.storage
    v = s.active_version
    st.delete_ids("images", [3])  # an interrupted remove: its vector, label remain
    ids, X = st.read_vectors(v, [10, 11])
    st.add_vectors(v, ids, X)  # a batch committed twice
    st.add_rows("predictions", [{"id": 3, "label": "a", "confidence": 0.9, "head": "knn", "version": v, "time": now()}])
    with st.write_lock():
        st.manifest["next_id"] = 50
        st.write_manifest()
    idx = root / "index" / f"{v}.faiss"
    raw = bytearray(idx.read_bytes())
    raw[-100] ^= 0xFF
    idx.write_bytes(bytes(raw))
    (root / "index" / "0123456789ab.faiss").write_bytes(b"old")  # a pruned version's leftover
    (root / "models").mkdir()
    temps = [root / "models" / ".tmp-999999999.pt", root / "manifest.json.tmp", root / "index" / f"{v}.faiss.tmp999999999"]
    for t in temps:
        t.write_bytes(b"partial")
    live = root / "models" / f".tmp-{sleeper_pid}.pt"  # a running fine-tune's file: left alone
    live.write_bytes(b"in progress")
    return {"temps": temps, "live": live, "version": v}


def test_check_reports_and_repairs_what_is_safe(store_dir):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        d = damage_store(store_dir, sleeper.pid)
        res = invoke("check", store_dir, "--json")
        assert res.exit_code == 1, res.output
        found = {f["code"]: f for f in json.loads(res.stdout)["findings"]}
        want = {"next-id", "duplicate-vectors", "orphan-vectors", "orphan-labels", "orphan-predictions",
                "index-damaged", "index-leftover", "temp-file"}
        assert want <= set(found), sorted(found)
        assert all(found[c]["repairable"] and found[c]["message"] and found[c]["fix"] for c in want)
        assert "new images would get ids of existing ones" in found["next-id"]["message"]

        res = invoke("check", store_dir, "--repair")
        assert res.exit_code == 0, res.output
        assert "(repaired)" in res.stdout and "store is OK" in res.stdout
        assert not any(t.exists() for t in d["temps"]) and d["live"].exists()
        assert not (store_dir / "index" / "0123456789ab.faiss").exists()
        s = embedstore.open(store_dir, create=False)
        st, v = s.storage, d["version"]
        assert s.count_images() == 79 and s.labels() == {0: "a", 1: "a", 2: "a"}  # images and their labels kept
        assert sorted(st.vector_ids(v).tolist()) == sorted(st.image_ids()) and st.count(vectors_table_name(v)) == 79
        assert st.count("predictions") == 0 and st.manifest["next_id"] == 80
        fx.load(st.index_path(v), s.version_info()["dim"])
        again = s.check()
        assert again.ok and not again.problems and json.dumps(again.to_dict())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_check_reports_what_it_cannot_repair(store_dir):
    s = embedstore.open(store_dir, create=False)
    s.label([0], "a")
    v = s.active_version
    with s.write_lock():  # a fine-tuned version whose weights file is gone
        s.storage.versions["feedc0ffee00"] = {**s.version_info(), "parent": v, "weights": "models/feedc0ffee00.pt"}
        s.storage.write_manifest()
    for f in (store_dir / "lance" / "labels.lance").rglob("*.lance"):  # a table whose data files are gone
        f.unlink()
    res = embedstore.Store.check_path(store_dir, repair=True)
    codes = {f.code: f for f in res.findings}
    assert not res.ok and "weights-missing" in codes and not codes["weights-missing"].repaired
    assert f"embedstore use STORE {v}" in codes["weights-missing"].fix
    assert "table labels cannot be read" in codes["table-unreadable"].message and not codes["table-unreadable"].repaired
    assert s.count_images() == 80


@pytest.fixture()
def labeled_store_dir(store_dir):
    s = embedstore.open(store_dir, create=False)
    s.label(list(range(0, 80, 10)), "even")
    s.label(list(range(5, 80, 10)), "odd")
    return store_dir


def test_a_healthy_store_checks_ok(labeled_store_dir):
    s = embedstore.open(labeled_store_dir, create=False)
    s.search(id=0, k=3)
    res = invoke("check", labeled_store_dir, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["ok"] and not [f for f in d["findings"] if f["severity"] != "info"] and d["repaired"] == 0
    one_line_error(invoke("check", labeled_store_dir.parent / "nope.es"), "no store at")


# ---- 4: a store the user cannot write -----------------------------------------------------------------
RUNNER = textwrap.dedent("""
    import json, sys, time
    from typer.testing import CliRunner
    from embedstore.cli.app import app
    out = []
    for args in json.loads(sys.argv[1]):
        t0 = time.perf_counter()
        r = CliRunner().invoke(app, args)
        out.append({"args": args, "code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr, "s": time.perf_counter() - t0,
                    "exception": None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)})
    print(json.dumps(out))
""")


def unprivileged_prefix() -> tuple[list[str], dict]:
    """How to start a process that obeys file permissions: (command prefix, subprocess.run kwargs)."""
    if os.geteuid() != 0:
        return [], {}
    try:
        if subprocess.run([sys.executable, "-c", "pass"], user="nobody", capture_output=True).returncode == 0:
            return [], {"user": "nobody"}
    except OSError:  # nobody cannot reach the interpreter (e.g. it lives under /root)
        pass
    setpriv = shutil.which("setpriv")  # root without the capabilities that bypass permissions (the interpreter
    if setpriv:                        # lives where nobody cannot reach it, e.g. under /root)
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
        if subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True).returncode == 0:
            return prefix, {}
    pytest.skip("running as root and can neither become nobody nor drop CAP_DAC_OVERRIDE (no setpriv)")


@pytest.fixture()
def shared_dir():
    """A folder every user can reach (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="es-ro-"))
    d.chmod(0o755)
    yield d
    subprocess.run(["chmod", "-R", "u+w", str(d)], check=True)
    shutil.rmtree(d)


def run_unprivileged(commands: list[list[str]], home: Path) -> list[dict]:
    prefix, kw = unprivileged_prefix()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT)}
    r = subprocess.run([*prefix, sys.executable, "-c", RUNNER, json.dumps(commands)], capture_output=True, text=True,
                       env=env, cwd=str(home), timeout=600, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def read_only_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    subprocess.run(["chmod", "-R", "a+rX,a-w", str(dst)], check=True)
    return dst


def test_read_only_store_reads_work_and_writes_fail_with_one_line(labeled_store_dir, photo_dir, shared_dir):
    want = {c: json.loads(invoke(c, labeled_store_dir, *rest).stdout) for c, *rest in (
        ["search", "--id", "7", "-k", "5", "--json"], ["duplicates", "--threshold", "0.9", "--json"], ["labels", "--json"])}
    fresh = read_only_copy(labeled_store_dir, shared_dir / "fresh.es")  # index saved and fresh
    shutil.rmtree(labeled_store_dir / "index")  # the index needs a rebuild, and the store is of format 1
    make_format_1(labeled_store_dir)
    old = read_only_copy(labeled_store_dir, shared_dir / "old.es")
    work = shared_dir / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    imgs = shared_dir / "imgs"
    shutil.copytree(sorted(p for p in photo_dir.iterdir() if p.is_dir())[0], imgs)
    subprocess.run(["chmod", "-R", "a+rX", str(imgs)], check=True)
    before = {p: tree_digest(p) for p in (fresh, old)}

    reads = [[c, str(st), *rest] for st in (fresh, old) for c, *rest in (
        ["info", "--json"], ["search", "--id", "7", "-k", "5", "--json"], ["duplicates", "--threshold", "0.9", "--json"],
        ["labels", "--json"], ["versions", "--json"], ["check", "--json"])]
    reads.append(["export", str(old), str(work / "labels.csv")])
    writes = [["add", str(fresh), str(imgs)], ["label", str(fresh), "--ids", "3", "--class", "x"],
              ["unlabel", str(fresh), "--ids", "0"], ["classify", str(old)], ["eval", str(fresh), "--shots", "1", "--episodes", "1"],
              ["index", str(old)], ["check", str(old), "--repair"]]
    results = run_unprivileged(reads + writes, work)
    print({" ".join(r["args"][:1]): round(r["s"], 2) for r in results})

    for r in results[: len(reads)]:
        assert r["code"] == 0 and r["exception"] is None, r
    by = {(r["args"][0], r["args"][1]): r for r in results[: len(reads)]}
    for st in (fresh, old):
        hits = json.loads(by["search", str(st)]["stdout"])
        assert [h["id"] for h in hits] == [h["id"] for h in want["search"]] and len(hits) == 5
        np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in want["search"]], atol=1e-5)
        assert json.loads(by["duplicates", str(st)]["stdout"]) == want["duplicates"]
        assert json.loads(by["labels", str(st)]["stdout"]) == want["labels"]
        assert json.loads(by["check", str(st)]["stdout"])["ok"]
    assert (work / "labels.csv").read_text().count("\n") == 17  # header + 16 labels
    for r in results[len(reads):]:
        assert r["code"] == 2 and r["exception"] is None, r
        err = r["stderr"].strip().splitlines()[-1]  # eval and classify compute first (their progress bar) and then fail
        assert err.startswith("error: store ") and "is not writable by you" in err and "Traceback" not in r["stderr"], r
    assert {p: tree_digest(p) for p in (fresh, old)} == before  # nothing written: no index saved, no migration
