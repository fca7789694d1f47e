"""The store: one directory, LanceDB tables as the source of truth, a JSON manifest, a write lock.

    STORE/
      manifest.json         schema version, versions (backbone name, weights, fingerprint, dim, preprocess), active
      lance/                LanceDB: images, vectors_<version> (one per backbone version), errors, and the
                            tables other stages add (labels, predictions, evals)
      index/                FAISS index files: caches, always rebuildable from lance/
      models/               fine-tuned weights (new backbone versions)
      .lock                 write lock (fcntl), held by the one process writing

Every vector row lives in the table of the backbone version it was made with, so vectors of two models
are never mixed. `add` first records new images (content-hash dedup), then embeds every image that has
no vector in the active version, committing in batches: a killed run, started again, continues where it
stopped and embeds nothing twice.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedstore.ingest.backbones import DEFAULT_BACKBONE, load_backbone, parse_name
from embedstore.ingest.backbones.base import Backbone
from embedstore.errors import (
    BackboneMismatchError,
    EmptyInputError,
    InvalidArgumentError,
    NoImagesAddedError,
    StoreLockedError,
    StoreNotFoundError,
)
from embedstore.labels.labels import LabelMixin
from embedstore.loop.versions import LoopMixin
from embedstore.search.search import SearchMixin

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COMMIT_EVERY = 256  # images per vector commit: a kill loses at most this much work
HASH_ALGO = "blake2b"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def content_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


IMAGES_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("hash", pa.string()),
        ("size", pa.int64()),
        ("added", pa.timestamp("us", tz="UTC")),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("path", pa.string()), ("hash", pa.string()), ("error", pa.string()), ("time", pa.timestamp("us", tz="UTC"))]
)


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])


def vectors_table_name(version: str) -> str:
    return f"vectors_{version}"


@dataclass
class VectorSet:
    """ids (N,), paths (N,), vectors (N, D) float32 L2-normalised — for users' own analysis."""

    ids: np.ndarray
    paths: list[str]
    vectors: np.ndarray
    version: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):  # ids, paths, X = store.vectors()
        return iter((self.ids, self.paths, self.vectors))


@dataclass
class AddResult:
    added: int = 0
    skipped_duplicates: int = 0
    skipped_known_errors: int = 0
    replaced: int = 0
    resumed: int = 0
    errors: int = 0
    error_list: list[dict] = field(default_factory=list)
    missing_paths: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    batch_size: int = 0
    device: str = "cpu"

    @property
    def images_per_second(self) -> float:
        n = self.added + self.resumed
        return n / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "added": self.added,
            "skipped_duplicates": self.skipped_duplicates,
            "skipped_known_errors": self.skipped_known_errors,
            "replaced": self.replaced,
            "resumed": self.resumed,
            "errors": self.errors,
            "error_list": self.error_list,
            "missing_paths": self.missing_paths,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "batch_size": self.batch_size,
            "device": self.device,
        }


class Store(SearchMixin, LabelMixin, LoopMixin):
    """An embedding store on disk. Create or open one with `embedstore.open(path, ...)`."""

    def __init__(self, root: Path, manifest: dict, device: str = "auto", lock_timeout: float = 30.0):
        import lancedb

        self.root = Path(root)
        self.manifest = manifest
        self.device_request = device
        self.lock_timeout = lock_timeout
        self.db = lancedb.connect(str(self.root / "lance"))
        self._backbone: Backbone | None = None
        self._lock_depth = 0
        self._lock_fd = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        backbone: str | None = None,
        weights: str | None = None,
        *,
        create: bool = True,
        device: str = "auto",
        lock_timeout: float = 30.0,
    ) -> "Store":
        root = Path(path).expanduser().resolve()
        mpath = root / MANIFEST
        if mpath.is_file():
            manifest = json.loads(mpath.read_text())
            store = cls(root, manifest, device, lock_timeout)
            store._check_backbone_request(backbone, weights)
            return store
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreNotFoundError(
                f"{root} exists but is not an embedstore store (no {MANIFEST}); pick a new or empty directory"
            )
        if not create:
            raise StoreNotFoundError(f"no store at {root}; create one with: embedstore add {path} IMAGES...")
        name = backbone or DEFAULT_BACKBONE
        parse_name(name)  # fail on a bad name before touching the disk
        from embedstore.ingest.pipeline import resolve_device

        bb = load_backbone(name, weights, device=resolve_device(device))
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": _now().isoformat(),
            "active_version": bb.version,
            "next_id": 0,
            "versions": {bb.version: {**bb.describe(), "created": _now().isoformat(), "parent": None}},
        }
        store = cls(root, manifest, device, lock_timeout)
        with store.write_lock():
            store._write_manifest()
        store._backbone = bb
        return store

    def _check_backbone_request(self, backbone: str | None, weights: str | None) -> None:
        if backbone is None and weights is None:
            return
        active = self.version_info()
        same_name = backbone is None or str(parse_name(backbone)) == active["name"]
        same_weights = weights is None or (
            active.get("weights_id", "").endswith(_file_sha256(weights)) if Path(weights).is_file() else False
        )
        if not (same_name and same_weights):
            asked = backbone or active["name"]
            if weights:
                asked += f" with weights {weights}"
            raise BackboneMismatchError(
                f"store {self.root} holds vectors of {active['name']} (version {self.active_version}); "
                f"got {asked}. Omit --backbone/--weights to use the store's own, or create a new store"
            )

    # ---- manifest & versions -------------------------------------------------------------
    @property
    def active_version(self) -> str:
        return self.manifest["active_version"]

    def version_info(self, version: str | None = None) -> dict:
        return self.manifest["versions"][version or self.active_version]

    def _write_manifest(self) -> None:
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2))
        os.replace(tmp, self.root / MANIFEST)

    def reload_manifest(self) -> None:
        self.manifest = json.loads((self.root / MANIFEST).read_text())

    # ---- locking -------------------------------------------------------------------------
    @contextmanager
    def write_lock(self, timeout: float | None = None):
        """Exclusive write lock across processes; waits up to `timeout` seconds, then StoreLockedError."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        timeout = self.lock_timeout if timeout is None else timeout
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise StoreLockedError(
                        f"store {self.root} is being written by another process (pid {holder}); "
                        "wait for it to finish, or stop it, then retry"
                    )
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd, self._lock_depth = fd, 1
        try:
            self.reload_manifest() if (self.root / MANIFEST).exists() else None
            yield
        finally:
            self._lock_depth = 0
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ---- tables --------------------------------------------------------------------------
    def table(self, name: str, schema: pa.Schema | None = None):
        """Open a LanceDB table; create it (empty, with `schema`) when missing and a schema is given."""
        if name in self.table_names():
            return self.db.open_table(name)
        if schema is None:
            return None
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def table_names(self) -> list[str]:
        res = self.db.list_tables()
        return list(getattr(res, "tables", res))

    def read_table(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table | None:
        t = self.table(name)
        if t is None:
            return None
        if where is None and columns is None:
            return t.to_arrow()
        q = t.search()
        if where:
            q = q.where(where)
        if columns:
            q = q.select(list(columns))
        return q.limit(None).to_arrow()

    def vectors_table(self, version: str | None = None, create: bool = False):
        version = version or self.active_version
        schema = vectors_schema(self.version_info(version)["dim"]) if create else None
        return self.table(vectors_table_name(version), schema)

    # ---- backbone ------------------------------------------------------------------------
    @property
    def device(self) -> str:
        from embedstore.ingest.pipeline import resolve_device

        return resolve_device(self.device_request)

    @property
    def backbone(self) -> Backbone:
        """The active version's backbone, loaded on first use (info() never loads a model)."""
        if self._backbone is None or self._backbone.version != self.active_version:
            info = self.version_info()
            bb = load_backbone(info["name"], self._weights_file(info), device=self.device)
            if bb.version != self.active_version:
                raise BackboneMismatchError(
                    f"backbone {info['name']} now loads as version {bb.version}, but the store's vectors are "
                    f"version {self.active_version} (weights or preprocessing changed); restore the original "
                    "weights or re-create the store"
                )
            self._backbone = bb
        return self._backbone

    # ---- adding images -------------------------------------------------------------------
    def add(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = True,
        gpu_decode: bool = False,
    ) -> AddResult:
        """Add image files/folders: dedup by content hash, embed new images, commit in batches."""
        from embedstore.ingest.pipeline import list_image_files

        t0 = time.perf_counter()
        paths = list(paths)
        if not paths:
            raise EmptyInputError("no paths given; pass image files or folders to add")
        files, missing = list_image_files(paths)
        if not files:
            what = ", ".join(missing[:3]) if missing else ", ".join(map(str, paths[:3]))
            raise EmptyInputError(f"no image files found in {what}; pass image files or folders holding them")
        res = AddResult(missing_paths=missing)
        with self.write_lock():
            new_ids = self._record_images(files, res, progress)
            pending = self.pending_images()
            res.resumed = len([i for i, _ in pending if i not in new_ids])
            self._embed_pending(
                pending, res, batch_size=batch_size, workers=workers, progress=progress, gpu_decode=gpu_decode
            )
            res.added = len(new_ids) - len([e for e in res.error_list if e["id"] in new_ids])
            if res.added + res.resumed > 0:
                self._after_vectors_changed()
        res.seconds = time.perf_counter() - t0
        if res.added == 0 and res.resumed == 0 and res.errors and not res.skipped_duplicates + res.skipped_known_errors:
            raise NoImagesAddedError(
                f"none of the {res.errors} file(s) could be read as images (first: {res.error_list[0]['path']}: "
                f"{res.error_list[0]['error']}); see `embedstore info --json` for the errors table"
            )
        return res

    def _record_images(self, files: list[str], res: AddResult, progress: bool) -> set[int]:
        """Insert rows for new content; same bytes already present (any path) are skipped."""
        images = self.table("images", IMAGES_SCHEMA)
        known = self.read_table("images", ["id", "path", "hash"])
        by_hash = set(known.column("hash").to_pylist())
        errs = self.read_table("errors", ["path", "hash"])
        bad = set(zip(errs.column("path").to_pylist(), errs.column("hash").to_pylist())) if errs is not None else set()
        by_path = dict(zip(known.column("path").to_pylist(), zip(known.column("id").to_pylist(), known.column("hash").to_pylist())))
        rows, replaced = [], []
        for path in _progress_iter(files, "hashing", progress):
            try:
                h, size = content_hash(path), os.path.getsize(path)
            except OSError as e:
                self._record_error(path, f"{type(e).__name__}: {e}", None)
                res.errors += 1
                res.error_list.append({"id": None, "path": path, "error": str(e)})
                continue
            if h in by_hash:
                res.skipped_duplicates += 1
                continue
            if (path, h) in bad:  # failed before with these very bytes: not retried
                res.skipped_known_errors += 1
                continue
            if path in by_path:  # same path, new bytes: the old image is replaced
                replaced.append(by_path[path][0])
            by_hash.add(h)
            rows.append({"path": path, "hash": h, "size": size, "added": _now()})
        if replaced:
            self._delete_ids(replaced)
            res.replaced = len(replaced)
        if not rows:
            return set()
        start = int(self.manifest.get("next_id", 0))
        self.manifest["next_id"] = start + len(rows)
        self._write_manifest()  # reserve ids first: a kill after this never reuses them
        for i, r in enumerate(rows):
            r["id"] = start + i
        for i in range(0, len(rows), 5000):
            images.add(pa.Table.from_pylist(rows[i : i + 5000], schema=IMAGES_SCHEMA))
        return {r["id"] for r in rows}

    def pending_images(self, version: str | None = None) -> list[tuple[int, str]]:
        """Images with no vector in `version` (the active one by default), in id order."""
        imgs = self.read_table("images", ["id", "path"])
        if imgs is None or imgs.num_rows == 0:
            return []
        vt = self.vectors_table(version, create=True)
        have = set(vt.search().select(["id"]).limit(None).to_arrow().column("id").to_pylist())
        pairs = sorted(zip(imgs.column("id").to_pylist(), imgs.column("path").to_pylist()))
        return [(i, p) for i, p in pairs if i not in have]

    def _embed_pending(
        self, pending, res: AddResult, *, batch_size, workers, progress, version=None, gpu_decode: bool = False
    ) -> None:
        from embedstore.ingest.pipeline import EmbedStats, embed_items

        if not pending:
            return
        version = version or self.active_version
        bb = self.backbone if version == self.active_version else self._load_version(version)
        vt = self.vectors_table(version, create=True)
        stats = EmbedStats()
        buf_ids, buf_vecs = [], []

        def flush():
            if buf_ids:
                ids = np.concatenate(buf_ids)
                vecs = np.concatenate(buf_vecs)
                vt.add(pa.table({"id": ids, "vector": _fixed_list(vecs)}))
                buf_ids.clear()
                buf_vecs.clear()

        paths = dict(pending)  # for error rows
        with _progress_bar(len(pending), f"embedding ({self.device})", progress) as advance:
            buffered = 0
            for ids, vecs, bad in embed_items(
                bb, pending, device=self.device, batch_size=batch_size, workers=workers, progress=advance, stats=stats,
                gpu_decode=gpu_decode,
            ):
                if len(ids):
                    buf_ids.append(ids)
                    buf_vecs.append(vecs)
                    buffered += len(ids)
                if bad:
                    flush()
                    buffered = 0
                    hashes = self._hashes_for([i for i, _ in bad])
                    for id_, err in bad:
                        self._record_error(paths[id_], err, hashes.get(id_))
                        res.error_list.append({"id": id_, "path": paths[id_], "error": err})
                    res.errors += len(bad)
                    if version == self.active_version and not self._has_other_vectors([i for i, _ in bad], version):
                        self._delete_ids([i for i, _ in bad])  # never embedded: the image was not really added
                if buffered >= COMMIT_EVERY:
                    flush()
                    buffered = 0
            flush()
        res.embed_seconds = stats.seconds
        res.batch_size, res.device = stats.batch_size, stats.device

    def _has_other_vectors(self, ids: Sequence[int], version: str) -> bool:
        """Whether any of `ids` has a vector in another version (then its labels must survive a bad re-read)."""
        pred = f"id IN ({', '.join(str(int(i)) for i in ids)})"
        for v in self.manifest["versions"]:
            t = self.vectors_table(v) if v != version else None
            if t is not None and t.count_rows(pred) > 0:
                return True
        return False

    def _load_version(self, version: str) -> Backbone:
        info = self.version_info(version)
        return load_backbone(info["name"], self._weights_file(info), device=self.device)

    def _weights_file(self, info: dict) -> str | None:
        """A version's weights file; relative paths (fine-tuned versions, STORE/models/) are inside the store."""
        w = info.get("weights")
        return str(self.root / w) if w and not os.path.isabs(w) else w

    def _record_error(self, path: str, error: str, hash_: str | None) -> None:
        t = self.table("errors", ERRORS_SCHEMA)
        t.delete(f"path = {_sql_str(path)}")
        row = {"path": path, "hash": hash_, "error": error, "time": _now()}
        t.add(pa.Table.from_pylist([row], schema=ERRORS_SCHEMA))

    def _hashes_for(self, ids: Sequence[int]) -> dict[int, str]:
        t = self.read_table("images", ["id", "hash"], where=f"id IN ({', '.join(str(int(i)) for i in ids)})")
        return dict(zip(t.column("id").to_pylist(), t.column("hash").to_pylist()))

    def _after_vectors_changed(self) -> None:
        """Compact small commits; stages that cache derived data (the index) hook in here."""
        try:
            self.vectors_table().optimize()
            self.table("images").optimize()
        except Exception:  # compaction is an optimisation only
            pass
        hook = getattr(super(), "_after_vectors_changed", None)  # the mixins' hooks (Store comes first in the MRO)
        if hook is not None:
            hook()

    # ---- removing ------------------------------------------------------------------------
    def remove(self, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None) -> int:
        """Remove images (their vectors in every version, labels, predictions) by id or path."""
        ids = [int(i) for i in (ids if ids is not None else [])]
        if paths:
            want = [str(Path(p).expanduser().resolve()) for p in paths]
            t = self.read_table("images", ["id", "path"], where=f"path IN ({', '.join(_sql_str(p) for p in want)})")
            ids += t.column("id").to_pylist()
        if not ids:
            return 0
        with self.write_lock():
            n = self._delete_ids(ids)
            self._after_vectors_changed()
        return n

    def _delete_ids(self, ids: Sequence[int]) -> int:
        ids = [int(i) for i in ids]
        pred = f"id IN ({', '.join(map(str, ids))})"
        before = self.table("images", IMAGES_SCHEMA).count_rows()
        for name in self.table_names():
            t = self.db.open_table(name)
            if "id" in t.schema.names:
                t.delete(pred)
        return before - self.table("images").count_rows()

    # ---- reading -------------------------------------------------------------------------
    def vectors(self, version: str | None = None, ids: Sequence[int] | None = None) -> VectorSet:
        """ids, paths and an (N, D) float32 array of the active (or given) version, in id order."""
        version = version or self.active_version
        vt = self.vectors_table(version)
        dim = self.version_info(version)["dim"]
        if vt is None:
            return VectorSet(np.zeros(0, np.int64), [], np.zeros((0, dim), np.float32), version)
        q = vt.search()
        if ids is not None:
            if len(ids) == 0:
                return VectorSet(np.zeros(0, np.int64), [], np.zeros((0, dim), np.float32), version)
            q = q.where(f"id IN ({', '.join(str(int(i)) for i in ids)})")
        t = q.limit(None).to_arrow()
        vid = t.column("id").to_numpy()
        order = np.argsort(vid, kind="stable")
        X = _to_matrix(t.column("vector"), dim)[order]
        vid = vid[order]
        paths = self.paths_for(vid)
        return VectorSet(vid, paths, X, version)

    def paths_for(self, ids: Sequence[int]) -> list[str]:
        imgs = self.read_table("images", ["id", "path"])
        lookup = dict(zip(imgs.column("id").to_pylist(), imgs.column("path").to_pylist())) if imgs else {}
        return [lookup.get(int(i), "") for i in ids]

    def errors(self) -> list[dict]:
        t = self.read_table("errors")
        return [] if t is None else [{"path": r["path"], "error": r["error"], "time": str(r["time"])} for r in t.to_pylist()]

    def count_images(self) -> int:
        t = self.table("images")
        return 0 if t is None else t.count_rows()

    def info(self) -> dict:
        """Counts and the active backbone; never loads a model."""
        v = self.version_info()
        vt = self.vectors_table()
        et = self.table("errors")
        out = {
            "path": str(self.root),
            "images": self.count_images(),
            "vectors": 0 if vt is None else vt.count_rows(),
            "backbone": v["name"],
            "weights": v.get("weights"),
            "version": self.active_version,
            "dim": v["dim"],
            "text": v.get("text", False),
            "errors": 0 if et is None else et.count_rows(),
            "versions": len(self.manifest["versions"]),
        }
        out.update(self._info_extra())
        return out

    def _info_extra(self) -> dict:
        """Stages add their own counts (labels, index) by overriding `info_*` methods in their mixins."""
        extra = {}
        for name in sorted(dir(self)):
            if name.startswith("info_") and callable(getattr(self, name)):
                try:
                    extra.update(getattr(self, name)())
                except Exception:
                    pass
        return extra

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, version={self.active_version})"


# ---- helpers ------------------------------------------------------------------------------
def _file_sha256(path: str) -> str:
    from embedstore.ingest.backbones.base import file_digest

    return file_digest(path)


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _fixed_list(vecs: np.ndarray) -> pa.FixedSizeListArray:
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])


def _to_matrix(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    if col.num_chunks == 0 or len(col) == 0:
        return np.zeros((0, dim), np.float32)
    arr = col.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


@contextmanager
def _progress_bar(total: int, label: str, enabled: bool):
    """A rich progress bar with items/s; a no-op when disabled (--json, library use)."""
    if not enabled or total == 0:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    class Rate(TextColumn):
        def render(self, task):
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} img/s" if speed else "", style="cyan")

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""), TimeRemainingColumn(),
        transient=False,
    ) as p:
        task = p.add_task(label, total=total)
        yield lambda n: p.advance(task, n)


def _progress_iter(items, label: str, enabled: bool):
    if not enabled or len(items) < 200:
        yield from items
        return
    with _progress_bar(len(items), label, True) as advance:
        for x in items:
            yield x
            advance(1)
