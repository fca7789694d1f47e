"""`embedstore check`: verify a whole store, and with repair=True fix what is safe to fix.

    what                      checked                                        --repair (under the write lock)
    manifest.json             parses, keys, active version exists            restore manifest.json.bak (or a complete
                                                                             leftover .tmp); else say what to do
    next_id                   above every image id (or new ids collide)      raise it
    lance/ tables             every table opens, reads, has its schema       none: restore the table from a backup
    images                    no id twice                                    none (images are never deleted)
    vectors_<version>         vector size, no id twice, ids are images       keep one row per id, drop orphan rows
    labels, predictions       only of images in the store                    drop orphan rows
    index/<version>.faiss     size and sha256 as recorded, shape             rebuild from lance/; delete index files
                                                                             of versions the manifest lacks
    models/<version>.pt       weights of every fine-tuned version exist      none: restore the file
    temp files                models/.tmp-*, manifest.json.tmp, index *.tmp*  delete (not a running process's)

Never deleted: images, and labels of images in the store. Informational findings (images waiting for a
vector, an unfinished fine-tune, a stale index) say which command finishes the work.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from embedstore import manifest as mf
from embedstore.errors import CorruptStoreError
from embedstore.results import Result
from embedstore.search import faiss_index as fx
from embedstore.search.index_cache import IndexCache
from embedstore.storage import SCHEMAS, Storage, vectors_schema, vectors_table_name

ERROR, WARNING, INFO = "error", "warning", "info"
TEMP_PID = re.compile(r"\.tmp-?(\d+)(\.\w+)?$")  # v.faiss.tmp123, .tmp-123.pt: the writer's pid


@dataclass
class CheckFinding(Result):
    """One thing found: what it is and means (message), what fixes it (fix), whether --repair fixed it."""

    code: str  # e.g. "orphan-vectors", "index-damaged"
    severity: str  # "error": data wrong or unusable until fixed; "warning": inconsistent or leftover; "info"
    message: str
    fix: str = ""
    repaired: bool = False
    repair: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def repairable(self) -> bool:
        return self.repair is not None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "repairable": self.repairable}


@dataclass
class CheckResult(Result):
    path: str
    ok: bool  # no error or warning left (repaired ones do not count)
    repair: bool
    findings: list[CheckFinding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was looked at
    seconds: float = 0.0

    @property
    def repaired(self) -> int:
        return sum(f.repaired for f in self.findings)

    @property
    def problems(self) -> list[CheckFinding]:
        """Errors and warnings not repaired."""
        return [f for f in self.findings if f.severity != INFO and not f.repaired]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "repaired": self.repaired, "seconds": round(self.seconds, 3)}


# ---- entry points ------------------------------------------------------------------------------
def check_path(root: str | os.PathLike, repair: bool = False) -> CheckResult:
    """Check the store at `root`, including one whose manifest cannot be read (restored from its backup on repair)."""
    t0 = time.perf_counter()
    root = Path(root).expanduser().resolve()
    try:
        storage = Storage.load(root)
    except CorruptStoreError as e:
        finding = _manifest_finding(root, str(e))
        if not (repair and finding.repairable):
            return CheckResult(str(root), False, repair, [finding], ["manifest"], time.perf_counter() - t0)
        finding.repair()
        finding.repaired = True
        storage = Storage.load(root)
        res = check_store(storage, IndexCache(storage, gpu_default=False), repair)
        res.findings.insert(0, finding)
        res.seconds = time.perf_counter() - t0
        return res
    return check_store(storage, IndexCache(storage, gpu_default=False), repair)


def check_store(storage: Storage, index: IndexCache, repair: bool = False) -> CheckResult:
    """Check an open store; with repair=True (under the write lock) apply every safe repair found."""
    return StoreChecker(storage, index).run(repair)


def _manifest_finding(root: Path, error: str) -> CheckFinding:
    m, source = mf.recover(root)
    if m is None:
        return CheckFinding(
            "manifest-unreadable", ERROR, error.split("; restore")[0] + "; no command works until it is restored",
            f"no usable copy to restore ({source}). Restore {root / mf.MANIFEST} from your own backup; the tables in "
            f"{root / 'lance'} are untouched. It cannot be rebuilt from the tables: it records each version's backbone",
        )

    def restore() -> None:
        fd = mf.acquire_lock(root, 30.0)
        try:
            if mf.parse(root / mf.MANIFEST)[0] is None:  # nobody fixed it meanwhile
                mf.write(root, m)
        finally:
            mf.release_lock(fd)

    return CheckFinding(
        "manifest-unreadable", ERROR, error.split("; restore")[0] + "; no command works until it is restored",
        f"restore it from {source} (the copy written with its last change; next_id is raised past the images if needed)",
        repair=restore,
    )


# ---- the checker ---------------------------------------------------------------------------------
class StoreChecker:
    """Runs every check over one open store, collecting findings (each with its repair, when one is safe)."""

    def __init__(self, storage: Storage, index: IndexCache):
        self.st = storage
        self.index = index
        self.unreadable: set[str] = set()
        self.image_ids = np.zeros(0, np.int64)

    def run(self, repair: bool = False) -> CheckResult:
        t0 = time.perf_counter()
        st = self.st
        findings: list[CheckFinding] = []
        holder = None if repair else mf.lock_holder(st.root)
        if holder:
            findings.append(CheckFinding(
                "store-being-written", INFO, f"process {holder} is writing the store now; findings may include its "
                "work in progress", "run check again when it is done"))
        with st.write_lock() if repair else nullcontext():
            checked = ["manifest", "tables", "images", "vectors", "labels", "predictions", "index", "models", "temp files"]
            for step in (self._tables, self._images, self._vectors, self._orphan_rows, self._indexes, self._models,
                         self._temp_files):
                findings += step()
            if repair:
                for f in findings:
                    if f.repair is not None and not f.repaired:
                        f.repair()
                        f.repaired = True
        ok = not any(f.severity != INFO and not f.repaired for f in findings)
        return CheckResult(str(st.root), ok, repair, findings, checked, time.perf_counter() - t0)

    # ---- tables and images -----------------------------------------------------------------------
    def _tables(self) -> list[CheckFinding]:
        st, out = self.st, []
        expected = {**SCHEMAS, **{vectors_table_name(v): vectors_schema(e["dim"]) for v, e in st.versions.items()}}
        for name in st.table_names():
            try:
                t = st.db.open_table(name)
                schema = t.schema
                cols = [c for c in schema.names if c != "vector"]  # vectors: ids only (sizes come from the schema)
                t.search().select(cols).limit(None).to_arrow()
            except Exception as e:  # LanceDB raises OSError, ValueError, RuntimeError, its own errors
                self.unreadable.add(name)
                out.append(CheckFinding(
                    "table-unreadable", ERROR, f"table {name} cannot be read ({fx._first_line(e)}); commands that use "
                    "it fail", f"restore {st.root / 'lance' / (name + '.lance')} from a backup"))
                continue
            want = expected.get(name)
            if want is None:
                out.append(self._unknown_table(name))
            elif [(f.name, f.type) for f in schema] != [(f.name, f.type) for f in want]:
                self.unreadable.add(name)
                out.append(CheckFinding(
                    "table-schema", ERROR, f"table {name} has columns {schema.names} of other types than this "
                    f"embedstore writes ({want.names}); it was changed by another program", "restore it from a backup"))
        return out

    def _unknown_table(self, name: str) -> CheckFinding:
        what = f"vectors of version {name[len('vectors_'):]}, which the manifest does not list" if name.startswith(
            "vectors_") else "a table embedstore does not use"
        return CheckFinding(
            "unknown-table", WARNING, f"table {name} holds {what} (a manifest restored from an older copy, or a "
            "pruned version's leftover); nothing reads it",
            "left alone (it may be the only copy of a version's vectors); delete its folder in lance/ once you know "
            "it is not needed")

    def _images(self) -> list[CheckFinding]:
        st, out = self.st, []
        if "images" in self.unreadable:
            return out
        ids = st.read_table("images", ["id"])
        self.image_ids = np.zeros(0, np.int64) if ids is None else np.sort(ids.column("id").to_numpy().astype(np.int64))
        dup = _duplicates(self.image_ids)
        if len(dup):
            out.append(CheckFinding(
                "duplicate-image-ids", ERROR, f"{len(dup)} image id(s) appear on more than one image row "
                f"({_some(dup)}); labels and vectors of those ids are ambiguous",
                "not repaired (images are never deleted by check); remove and re-add those images"))
        top = int(self.image_ids[-1]) if len(self.image_ids) else -1
        if top >= st.manifest["next_id"]:
            out.append(CheckFinding(
                "next-id", ERROR, f"next_id {st.manifest['next_id']} is not above the largest image id {top}: new "
                "images would get ids of existing ones", f"raise next_id to {top + 1}", repair=lambda: self._raise_next_id(top)))
        return out

    def _raise_next_id(self, top: int) -> None:
        self.st.manifest["next_id"] = max(self.st.manifest["next_id"], top + 1)
        self.st.write_manifest()

    # ---- vectors, labels, predictions ------------------------------------------------------------
    def _vectors(self) -> list[CheckFinding]:
        st, out = self.st, []
        for v, e in st.versions.items():
            name = vectors_table_name(v)
            if name in self.unreadable or "images" in self.unreadable or st.table(name) is None:
                continue
            ids = st.vector_ids(v)
            dup, orphan = _duplicates(ids), np.setdiff1d(ids, self.image_ids)
            if len(dup):
                out.append(CheckFinding(
                    "duplicate-vectors", WARNING, f"{len(dup)} image(s) have more than one vector in version {v} "
                    "(a batch committed twice); they count twice and can show up twice in search",
                    "keep one vector per image", repair=lambda v=v, d=dup: self._dedupe(v, d)))
            if len(orphan):
                out.append(CheckFinding(
                    "orphan-vectors", WARNING, f"{len(orphan)} vector(s) in version {v} belong to no image (an "
                    f"interrupted remove); search can return them with no path (ids {_some(orphan)})",
                    "delete them", repair=lambda v=v, o=orphan: self._drop(vectors_table_name(v), o, v)))
            pending = len(np.setdiff1d(self.image_ids, ids))
            if pending and v == st.active_version:
                out.append(CheckFinding(
                    "pending-images", INFO, f"{pending} image(s) have no vector in the active version yet (an "
                    "interrupted add); search does not find them", "the next `embedstore add STORE ...` embeds them"))
            if e.get("status") == "embedding":
                out.append(CheckFinding(
                    "unfinished-version", INFO, f"version {v} was left unfinished by an interrupted fine-tune "
                    f"({pending} image(s) without its vector)", "`embedstore finetune STORE` completes it"))
        return out

    def _dedupe(self, version: str, dup: np.ndarray) -> None:
        name = vectors_table_name(version)
        rows = self.st.read_ids(name, dup, ["id", "vector"])
        _, first = np.unique(rows.column("id").to_numpy(), return_index=True)
        self.st.delete_ids(name, dup)  # a kill here leaves them pending: the next add embeds them again
        self.st.table(name).add(rows.take(first))
        self.index.after_change(version)

    def _drop(self, table: str, ids: np.ndarray, version: str | None = None) -> None:
        self.st.delete_ids(table, ids.tolist())
        if version is not None:
            self.index.after_change(version)

    def _orphan_rows(self) -> list[CheckFinding]:
        st, out = self.st, []
        if "images" in self.unreadable:
            return out
        for name, what in (("labels", "they are counted in class totals and used as training data"),
                           ("predictions", "export and the review page show them")):
            t = None if name in self.unreadable else st.read_table(name, ["id"])
            if t is None:
                continue
            orphan = np.setdiff1d(t.column("id").to_numpy().astype(np.int64), self.image_ids)
            if len(orphan):
                out.append(CheckFinding(
                    f"orphan-{name}", WARNING, f"{len(orphan)} {name} belong to images no longer in the store (an "
                    f"interrupted remove); {what}", f"delete them ({name} of images in the store are kept)",
                    repair=lambda n=name, o=orphan: self._drop(n, o)))
        return out

    # ---- index, models, temp files ---------------------------------------------------------------
    def _indexes(self) -> list[CheckFinding]:
        st, out = self.st, []
        for v, e in st.versions.items():
            path = st.index_path(v)
            if not path.exists() and not fx.sidecar_path(path).exists():
                continue
            try:
                _, meta = fx.load(path, e["dim"])
            except fx.IndexFileError as err:
                has_vectors = st.count(vectors_table_name(v)) > 0 and vectors_table_name(v) not in self.unreadable
                out.append(CheckFinding(
                    "index-damaged", WARNING, f"index of version {v} cannot be used ({err}); the next search rebuilds "
                    "it (slow on a big store)", "rebuild it now" if has_vectors else "delete it (no vectors to index)",
                    repair=(lambda v=v: self._rebuild(v)) if has_vectors else (lambda p=path: _unlink(p, fx.sidecar_path(p)))))
                continue
            if meta.get("lance_version") != st.table_version(vectors_table_name(v)):
                out.append(CheckFinding(
                    "index-stale", INFO, f"index of version {v} predates the latest change of its vectors",
                    "the next search brings it up to date"))
        for p in sorted(st.root.joinpath("index").glob("*")) if st.root.joinpath("index").is_dir() else []:
            if p.stem not in st.versions and not TEMP_PID.search(p.name) and p.suffix in (".faiss", ".json"):
                out.append(CheckFinding(
                    "index-leftover", WARNING, f"{p.relative_to(st.root)} belongs to version {p.stem}, which the "
                    "manifest does not list (a pruned version's leftover); it takes space", "delete it",
                    repair=lambda p=p: _unlink(p)))
        return out

    def _rebuild(self, version: str) -> None:
        self.index.forget(version)
        self.index.rebuild(version, reason="check")

    def _models(self) -> list[CheckFinding]:
        st, out = self.st, []
        for v, e in st.versions.items():
            w = st.weights_file(v)
            if e.get("parent") and w and not os.path.isfile(w):
                active = " It is the ACTIVE version: add and search --image fail." if v == st.active_version else ""
                out.append(CheckFinding(
                    "weights-missing", ERROR, f"weights of fine-tuned version {v} ({w}) are missing: it cannot embed "
                    f"new or query images; its stored vectors still serve search --id and labels.{active}",
                    f"restore {w} from a backup, or make another version active: embedstore use STORE {e['parent']}"))
        return out

    def _temp_files(self) -> list[CheckFinding]:
        st, out = self.st, []
        cands = [st.root / mf.TMP, *st.root.joinpath("models").glob(".tmp-*"), *st.root.joinpath("index").glob("*.tmp*")]
        for p in cands:
            if not p.is_file():
                continue
            m = TEMP_PID.search(p.name)
            if m and _alive(int(m.group(1))):
                continue  # being written by a running process (a fine-tune writes outside the lock)
            out.append(CheckFinding(
                "temp-file", WARNING, f"{p.relative_to(st.root)} ({p.stat().st_size} bytes) was left by an interrupted "
                "write; harmless, it takes space", "delete it", repair=lambda p=p: _unlink(p)))
        return out


def _duplicates(sorted_ids: np.ndarray) -> np.ndarray:
    return np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]) if len(sorted_ids) > 1 else sorted_ids[:0]


def _some(ids: np.ndarray, n: int = 5) -> str:
    return ", ".join(str(int(i)) for i in ids[:n]) + (", ..." if len(ids) > n else "")


def _unlink(*paths: Path) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
