"""The storage core: the only code that knows a store's directory.

    STORE/
      manifest.json         store format, versions (backbone name, weights, fingerprint, dim, preprocess), active
                            (+ manifest.json.bak, its last written copy); see manifest.py
      lance/                LanceDB tables (schemas below): images, vectors_<version> (one per backbone
                            version), errors, labels, predictions, evals. Or, when the store was made with
                            tables="s3://bucket/prefix" (manifest key "tables"), the tables live there, on
                            object storage, and the directory keeps only the small files below
      index/<version>.faiss FAISS index files and their JSON sidecars: caches, always rebuildable from lance/
      models/<version>.pt   fine-tuned weights (new backbone versions) and <version>.json training records
      .lock                 write lock (fcntl), held by the one process writing; a store whose lock the user
                            cannot open is read-only to them (reads work, writes raise StoreNotWritableError)

Every vector row lives in the table of the backbone version it was made with, so vectors of two models
are never mixed. Stage services (ingest, search, labels, loop) receive a `Storage` and use its table
helpers; none of them builds a path, a table name or an `id IN (...)` filter itself.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import lancedb
import numpy as np
import pyarrow as pa

from embedstore import manifest as mf
from embedstore.arrowutil import CHUNK, bytes_hash, chunks, content_hash, fixed_list, id_in, sql_str, to_matrix  # noqa: F401
from embedstore.clock import now_iso
from embedstore.errors import InvalidArgumentError, StoreLockedError, StoreNotFoundError, StoreNotWritableError
from embedstore.results import VectorSet

SCHEMA_VERSION = mf.FORMAT
MANIFEST = mf.MANIFEST
LOCK = mf.LOCK
TS = pa.timestamp("us", tz="UTC")

IMAGES_SCHEMA = pa.schema(
    [("id", pa.int64()), ("path", pa.string()), ("hash", pa.string()), ("size", pa.int64()), ("added", TS)]
)
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("hash", pa.string()), ("error", pa.string()), ("time", TS)])
LABELS_SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.string()), ("source", pa.string()), ("time", TS)])
PREDICTIONS_SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.string()), ("confidence", pa.float32()),
                                ("head", pa.string()), ("version", pa.string()), ("time", TS)])
EVALS_SCHEMA = pa.schema([("run_id", pa.string()), ("time", TS), ("version", pa.string()), ("n_labels", pa.int64()),
                          ("n_classes", pa.int64()), ("best_head", pa.string()), ("best_accuracy", pa.float64()),
                          ("results", pa.string())])
SCHEMAS = {
    "images": IMAGES_SCHEMA,
    "errors": ERRORS_SCHEMA,
    "labels": LABELS_SCHEMA,
    "predictions": PREDICTIONS_SCHEMA,
    "evals": EVALS_SCHEMA,
}


def vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim))])


def vectors_table_name(version: str) -> str:
    return f"vectors_{version}"


def object_store_options() -> dict[str, str]:
    """LanceDB storage options from the environment: credentials and the endpoint are read by Lance itself from
    AWS_*; an http:// endpoint (MinIO, moto, a local gateway) needs allow_http."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    return {"allow_http": "true"} if endpoint.startswith("http://") else {}


def check_tables_uri(uri: str) -> None:
    """Refuse a tables location that is not an object-storage URI LanceDB can use."""
    if not isinstance(uri, str) or "://" not in uri or uri.split("://")[0] not in ("s3", "gs", "az", "abfs", "memory"):
        raise InvalidArgumentError(f"--tables {uri!r} is not an object-storage URI; pass s3://BUCKET/PREFIX "
                                   "(or gs://, az://), or leave it out to keep the tables in the store folder")


class Storage:
    """One store directory: manifest + write lock, LanceDB tables, index and model file names."""

    def __init__(self, root: Path, manifest: dict, lock_timeout: float = 30.0):
        self.root = Path(root)
        self.manifest = manifest
        self.lock_timeout = lock_timeout
        self.tables_uri = manifest.get("tables") or str(self.root / "lance")
        self.remote = "://" in self.tables_uri
        self.storage_options = object_store_options() if self.remote else {}
        self.db = lancedb.connect(self.tables_uri, storage_options=self.storage_options or None)
        self._lock_depth = 0

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def exists(cls, root: Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @staticmethod
    def check_free(root: Path) -> None:
        """Raise unless `root` can become a new store (missing, or an empty directory)."""
        root = Path(root)
        if (root / mf.BACKUP).is_file() or ((root / "lance").is_dir() and any((root / "lance").iterdir())):
            mf.read(root)  # store data without a manifest: CorruptStoreError saying how to recover
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreNotFoundError(
                f"{root} exists but is not an embedstore store (no {MANIFEST}); pick a new or empty directory"
            )

    @classmethod
    def load(cls, root: Path, lock_timeout: float = 30.0) -> "Storage":
        """Open an existing store: its manifest checked (CorruptStoreError, StoreFormatError) and, when of an
        older format, migrated (on disk when the write lock can be had at once, else in memory)."""
        root = Path(root)
        if not cls.exists(root):
            cls.check_free(root)  # a store that lost its manifest says so
            raise StoreNotFoundError(f"no store at {root}; create one with: embedstore add {root} IMAGES...")
        storage = cls(root, mf.read(root), lock_timeout)
        if storage.manifest["schema_version"] < mf.FORMAT:
            try:
                with storage.write_lock(timeout=0):  # taking the lock migrates the files
                    pass
            except (StoreLockedError, StoreNotWritableError):
                storage.manifest = mf.upgrade(root, storage.manifest, write_files=False)
        return storage

    @classmethod
    def create(cls, root: Path, first_version: dict, version: str, lock_timeout: float = 30.0,
               tables: str | None = None) -> "Storage":
        """A new store directory whose one backbone version (`first_version`, describe()'d) is active; its
        tables in root/lance, or at `tables` (an object-storage URI such as s3://bucket/prefix)."""
        root = Path(root)
        cls.check_free(root)
        if tables is not None:
            check_tables_uri(tables)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno not in mf.READ_ONLY_ERRNOS:
                raise
            raise StoreNotWritableError(f"cannot create store {root} ({e.strerror}); pick a folder you can write") from None
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": now_iso("microseconds"),
            "active_version": version,
            "next_id": 0,
            "versions": {version: {**first_version, "created": now_iso("microseconds"), "parent": None}},
            **({"tables": tables.rstrip("/")} if tables else {}),
        }
        storage = cls(root, manifest, lock_timeout)
        with storage.write_lock():
            storage.write_manifest()
        return storage

    # ---- manifest & versions ------------------------------------------------------------------
    @property
    def active_version(self) -> str:
        return self.manifest["active_version"]

    @property
    def versions(self) -> dict[str, dict]:
        return self.manifest["versions"]

    def version_info(self, version: str | None = None) -> dict:
        return self.manifest["versions"][version or self.active_version]

    def write_manifest(self) -> None:
        """Atomic replace (temp file + rename) and a backup copy; call under the write lock."""
        mf.write(self.root, self.manifest)

    def reload_manifest(self) -> None:
        """Re-read the manifest (checked); one of an older format is migrated in memory only."""
        self.manifest = mf.upgrade(self.root, mf.read(self.root), write_files=False)

    def reserve_ids(self, n: int) -> int:
        """Reserve n new image ids (written to the manifest first: a kill never reuses them); returns the first."""
        start = int(self.manifest.get("next_id", 0))
        self.manifest["next_id"] = start + n
        self.write_manifest()
        return start

    # ---- locking ----------------------------------------------------------------------------
    @contextmanager
    def write_lock(self, timeout: float | None = None):
        """Exclusive write lock across processes (re-entrant); waits up to `timeout` s, then StoreLockedError.

        Taking it re-reads the manifest, so a writer always starts from the latest committed state."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = mf.acquire_lock(self.root, self.lock_timeout if timeout is None else timeout)
        self._lock_depth = 1
        try:
            if self.exists(self.root):
                self._read_and_migrate()
            yield
        finally:
            self._lock_depth = 0
            mf.release_lock(fd)

    def discard(self, made: str) -> bool:
        """Delete this just-made store if it holds no images or labels (see manifest.remove_store); True if so."""
        with self.write_lock():
            if self.count("images") or self.count("labels"):
                return False
            mf.remove_store(self.root, made)
        return True

    def require_writable(self) -> None:
        """Raise StoreNotWritableError now when this user cannot write the store (before slow work ending in a write)."""
        os.close(mf.open_lock(self.root))

    def _read_and_migrate(self) -> None:
        """Under the lock: re-read the manifest; one of an older format is migrated on disk (files, then manifest)."""
        m = mf.read(self.root)
        if m["schema_version"] < mf.FORMAT:
            self.manifest = mf.upgrade(self.root, m, write_files=True)
            self.write_manifest()
        else:
            self.manifest = m

    # ---- tables -----------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        res = self.db.list_tables()
        return list(getattr(res, "tables", res))

    def table(self, name: str, create: bool = False):
        """Open a LanceDB table; None when missing or still being created elsewhere, unless create=True."""
        if name in self.table_names():
            try:
                return self.db.open_table(name)
            except ValueError:  # "Table ... was not found": its first commit is not written yet
                pass
        if not create:
            return None
        return self.db.create_table(name, schema=self._schema(name), exist_ok=True)

    def _schema(self, name: str) -> pa.Schema:
        if name in SCHEMAS:
            return SCHEMAS[name]
        for v, info in self.versions.items():
            if name == vectors_table_name(v):
                return vectors_schema(info["dim"])
        raise KeyError(f"no schema for table {name!r}")

    def drop_table(self, name: str) -> None:
        if name in self.table_names():
            self.db.drop_table(name)

    def read_table(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table | None:
        """A whole table, or some columns / rows of it; None when the table does not exist."""
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

    def read_ids(self, name: str, ids: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table | None:
        """Rows of `name` whose id is in `ids`, read in chunks."""
        t = self.table(name)
        if t is None:
            return None
        ids = sorted({int(i) for i in ids})
        parts = [self.read_table(name, columns, where=id_in(c)) for c in chunks(ids)]
        return pa.concat_tables(parts) if parts else (t.schema.empty_table() if columns is None else
                                                       t.schema.empty_table().select(list(columns)))

    def count(self, name: str, where: str | None = None) -> int:
        t = self.table(name)
        return 0 if t is None else t.count_rows(where)

    def delete_ids(self, name: str, ids: Sequence[int]) -> None:
        t = self.table(name)
        if t is not None:
            for c in chunks(sorted({int(i) for i in ids})):
                t.delete(id_in(c))

    def delete_ids_everywhere(self, ids: Sequence[int]) -> int:
        """Delete the images `ids` from every table that has an id column; returns images removed."""
        before = self.count("images")
        for name in self.table_names():
            t = self.db.open_table(name)
            if "id" in t.schema.names:
                for c in chunks(sorted({int(i) for i in ids})):
                    t.delete(id_in(c))
        return before - self.count("images")

    def add_rows(self, name: str, rows: list[dict] | pa.Table, how: str = "append") -> None:
        """One commit (a kill leaves the old rows or the new): "append", "upsert" by id, or "replace" all."""
        t = self.table(name, create=True)
        data = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=self._schema(name))
        if how == "replace":
            t.add(data, mode="overwrite")
        elif data.num_rows and how == "upsert":
            t.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        elif data.num_rows:
            t.add(data)

    def compact(self, name: str, cleanup_older_than=None) -> None:
        """Merge small commits (an optimisation only: failures are ignored)."""
        t = self.table(name)
        if t is None:
            return
        try:
            t.optimize(cleanup_older_than=cleanup_older_than) if cleanup_older_than else t.optimize()
        except Exception:
            pass

    def table_version(self, name: str) -> int | None:
        """The LanceDB version of a table (None when it does not exist): a cache key for derived data."""
        t = self.table(name)
        return None if t is None else t.version

    def data_versions(self) -> dict[str, int | None]:
        """Table versions of the active vectors, labels and predictions: what UI caches key on."""
        names = {"vectors": vectors_table_name(self.active_version), "labels": "labels", "predictions": "predictions",
                 "images": "images"}
        return {"version": self.active_version, **{k: self.table_version(n) for k, n in names.items()}}

    def table_uri(self, name: str) -> str:
        """Where a table's Lance dataset lives (a local path or an object-storage URI): for readers such as Ray."""
        return f"{self.tables_uri}/{name}.lance"

    def table_stamp(self, name: str) -> tuple | None:
        """(inode, mtime) of a table's commit directory (every LanceDB commit adds a file there): a check
        cheaper than opening the table. None when missing or changed in the last 2 seconds, so coarse
        file-system clocks cannot hide a commit. None always on object storage (callers compare versions)."""
        if self.remote:
            return None
        try:
            s = os.stat(self.root / "lance" / f"{name}.lance" / "_versions")
        except OSError:
            return None
        if time.time_ns() - s.st_mtime_ns < 2_000_000_000:
            return None
        return (s.st_ino, s.st_mtime_ns)

    def read_with_paths(self, name: str) -> pa.Table:
        """A whole per-image table (labels, predictions) sorted by id, plus each image's path ("" if gone)."""
        t = self.read_table(name)
        t = (self._schema(name).empty_table() if t is None else t).sort_by("id")
        ids = t.column("id").to_pylist()
        lookup = self.paths_for(ids)
        return t.append_column("path", pa.array([lookup.get(i, "") for i in ids], pa.string()))

    # ---- images ------------------------------------------------------------------------------
    def paths_for(self, ids: Sequence[int]) -> dict[int, str]:
        """{id: path} of the given image ids (those in the store)."""
        t = self.read_ids("images", ids, ["id", "path"])
        return {} if t is None else dict(zip(t.column("id").to_pylist(), t.column("path").to_pylist()))

    def hashes_for(self, ids: Sequence[int]) -> dict[int, str]:
        t = self.read_ids("images", ids, ["id", "hash"])
        return {} if t is None else dict(zip(t.column("id").to_pylist(), t.column("hash").to_pylist()))

    def image_ids(self) -> set[int]:
        t = self.read_table("images", ["id"])
        return set() if t is None else set(t.column("id").to_pylist())

    def image_index(self) -> tuple[dict[str, int], dict[str, int]]:
        """({path: id}, {hash: id}) over every image."""
        t = self.read_table("images", ["id", "path", "hash"])
        if t is None:
            return {}, {}
        ids = t.column("id").to_pylist()
        return dict(zip(t.column("path").to_pylist(), ids)), dict(zip(t.column("hash").to_pylist(), ids))

    # ---- vectors -----------------------------------------------------------------------------
    def vectors_table(self, version: str | None = None, create: bool = False):
        return self.table(vectors_table_name(version or self.active_version), create=create)

    def vector_ids(self, version: str | None = None) -> np.ndarray:
        """Sorted ids that have a vector in `version`."""
        vt = self.vectors_table(version)
        if vt is None:
            return np.zeros(0, np.int64)
        return np.sort(vt.search().select(["id"]).limit(None).to_arrow().column("id").to_numpy().astype(np.int64))

    def read_vectors(self, version: str | None = None, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (N, D) float32) of `version` (all, or the given ids that have one), in table order."""
        version = version or self.active_version
        dim = self.version_info(version)["dim"]
        vt = self.vectors_table(version)
        if vt is None or (ids is not None and len(ids) == 0):
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        t = vt.to_arrow() if ids is None else self.read_ids(vectors_table_name(version), ids, ["id", "vector"])
        return t.column("id").to_numpy().astype(np.int64), to_matrix(t.column("vector"), dim)

    def vectors(self, version: str | None = None, ids: Sequence[int] | None = None) -> VectorSet:
        """ids, paths and an (N, D) float32 array of `version` (default: active), in id order."""
        version = version or self.active_version
        vid, X = self.read_vectors(version, ids)
        order = np.argsort(vid, kind="stable")
        vid, X = vid[order], X[order]
        lookup = self.paths_for(vid)
        return VectorSet(vid, [lookup.get(int(i), "") for i in vid], X, version)

    def add_vectors(self, version: str, ids: np.ndarray, vecs: np.ndarray) -> None:
        self.vectors_table(version, create=True).add(pa.table({"id": np.asarray(ids, np.int64), "vector": fixed_list(vecs)}))

    # ---- files beside the tables ---------------------------------------------------------------
    def index_path(self, version: str | None = None) -> Path:
        return self.root / "index" / f"{version or self.active_version}.faiss"

    def model_path(self, version: str) -> Path:
        return self.root / "models" / f"{version}.pt"

    def model_record_path(self, version: str) -> Path:
        return self.root / "models" / f"{version}.json"

    def model_weights_entry(self, version: str) -> str:
        """How the manifest names a fine-tuned version's weights: relative, so the store can move."""
        return str(self.model_path(version).relative_to(self.root))

    def weights_file(self, version: str | None = None) -> str | None:
        """A version's weights file; relative paths (fine-tuned versions, STORE/models/) are inside the store."""
        w = self.version_info(version).get("weights")
        return str(self.root / w) if w and not os.path.isabs(w) else w

    def version_files(self, version: str) -> list[Path]:
        """Every file that belongs to one version outside LanceDB (index, sidecar, weights, record)."""
        idx = self.index_path(version)
        return [idx, idx.with_suffix(".json"), self.model_path(version), self.model_record_path(version)]
