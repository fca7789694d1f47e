"""The FAISS index of a version, kept in step with its vectors table (LanceDB is the source of truth).

    STORE/index/<version>.faiss   the index (image ids inside: IVF natively, others via IndexIDMap)
    STORE/index/<version>.json    sidecar: factory, auto?, tuned params + measured recall, the LanceDB
                                  table version it matches, ids still inside but deleted, file size

Before each search the sidecar's table version is compared with the table's. When they differ the
index is brought up to date incrementally: vectors whose ids it lacks are added, ids no longer in the
table are removed (or, for HNSW which cannot remove, listed and filtered out with an IDSelector), and
the file is saved when the write lock is free. A missing, corrupt (size or sha256 unlike its sidecar's,
checked on the first load in a process) or mismatched file, a big change, or growth past the size where
another index type is chosen, means a rebuild from LanceDB. On a store the user cannot write, the index
is caught up or rebuilt in memory and not saved (it is a cache).
A rebuild reads the whole table into memory (faiss_index.build), or, for a store of 4 GiB of vectors or
more or when asked (stream=True), streams it: IVF-PQ trained on a sample, filled batch by batch
(streaming_index.py; meta "streamed": true). An index built streamed is rebuilt streamed.
The ingest service calls `after_change(version)` after add/remove, so the file on disk stays fresh.
Every method takes the version it works on: building the index of a version that is not (yet)
active needs no pretending.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from embedstore.arrowutil import chunks
from embedstore.clock import now_iso
from embedstore.errors import EmptyInputError, StoreLockedError, StoreNotWritableError
from embedstore.progress import progress_bar
from embedstore.results import IndexInfo, IndexSummary
from embedstore.search import faiss_index as fx
from embedstore.search import streaming_index as sx
from embedstore.storage import Storage, vectors_table_name

REBUILD_PENDING = 0.5  # rebuild instead of adding when new vectors exceed this fraction of the index
REBUILD_DELETED = 0.2  # rebuild when ids deleted but still inside (HNSW) exceed this fraction
PROGRESS_MIN = 50_000  # vectors from which an index build shows a progress bar


@dataclass
class IndexState:
    """A loaded index and what it knows about the table it mirrors."""

    index: object
    meta: dict
    ids: np.ndarray  # ids inside the index (including excluded ones)
    excluded: np.ndarray  # ids inside the index that are no longer in the table
    lance_version: int
    version: str
    gpu_index: object | None = None
    stamp: tuple | None = None
    _excl_sel: object | None = field(default=None, repr=False)

    def search(self, Q: np.ndarray, k: int, allowed: np.ndarray | None = None, boost: float = 1.0):
        """(scores, ids) for Q against the index, restricted to `allowed` ids when given."""
        if allowed is None and not len(self.excluded):
            if self.gpu_index is not None and k <= fx.GPU_MAX_K:
                return self.gpu_index.search(Q, k)
            return self.index.search(Q, k)
        if allowed is not None:
            sel = fx.faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
        else:
            if self._excl_sel is None:
                inner = fx.faiss.IDSelectorBatch(self.excluded)
                self._excl_sel = fx.faiss.IDSelectorNot(inner)
                self._excl_sel.referenced_objects = [inner]
            sel = self._excl_sel
        params = fx.search_params(self.index, self.meta.get("params") or {}, sel, boost)
        return self.index.search(Q, k, params=params)

    @property
    def live(self) -> int:
        return int(len(self.ids) - len(self.excluded))


class IndexCache:
    """Loaded index states by version; loads, catches up, rebuilds and saves them."""

    def __init__(self, storage: Storage, gpu_default: bool):
        self.storage = storage
        self.gpu_default = gpu_default  # search on a GPU copy when FAISS sees one (device not forced to cpu)
        self._states: dict[str, IndexState] = {}
        self._problems: dict[str, str] = {}

    def want_gpu(self, gpu: bool | None) -> bool:
        if gpu:
            fx.require_gpu()
            return True
        return bool(gpu is None and self.gpu_default and fx.gpu_available())

    def vectors_or_fail(self, version: str):
        vt = self.storage.vectors_table(version)
        if vt is None or vt.count_rows() == 0:
            raise EmptyInputError(
                f"store {self.storage.root} has no vectors to search; add images first: embedstore add STORE IMAGES..."
            )
        return vt

    # ---- the state of one version ------------------------------------------------------------
    def state(self, version: str, build_missing: bool = True) -> IndexState | None:
        """The index of `version`, in step with its vectors table (loaded, updated or rebuilt)."""
        st = self._states.get(version)
        stamp = self.storage.table_stamp(vectors_table_name(version))
        if st is not None and stamp is not None and st.stamp == stamp:
            return st  # the table's commit directory is untouched: nothing changed (the fast path)
        vt = self.storage.vectors_table(version)
        if vt is None:
            self.vectors_or_fail(version)
        lv = vt.version
        if st is not None and st.lance_version == lv:
            st.stamp = stamp
            return st
        if st is None:
            st = self._load(version)
        if st is None:
            if not build_missing:
                return None
            self.vectors_or_fail(version)
            st = self.rebuild(version, reason="missing")
        elif st.lance_version != lv:
            st = self._catch_up(st, vt, lv)
        st.stamp = stamp if st.lance_version == lv else None
        self._states[version] = st
        return st

    def after_change(self, version: str) -> None:
        """After add/remove (under the write lock): bring an existing index file up to date."""
        path = self.storage.index_path(version)
        try:
            if version in self._states or fx.sidecar_path(path).exists():
                self.state(version, build_missing=False)
        except Exception as e:  # the index is a cache: drop it, the next search rebuilds it
            if not isinstance(e, EmptyInputError):
                warnings.warn(f"index update failed ({fx._first_line(e)}); it will be rebuilt on the next search")
            self._states.pop(version, None)
            fx.sidecar_path(path).unlink(missing_ok=True)

    def forget(self, version: str) -> None:
        self._states.pop(version, None)

    def _load(self, version: str) -> IndexState | None:
        try:
            index, meta = fx.load(self.storage.index_path(version), self.storage.version_info(version)["dim"])
        except fx.IndexFileError as e:
            self._problems[version] = str(e)
            return None
        excluded = np.asarray(meta.get("deleted") or [], np.int64)
        st = IndexState(index, meta, fx.index_ids(index), excluded, int(meta.get("lance_version", -1)), version)
        st.gpu_index = fx.to_gpu(index, meta.get("params") or {}) if self.want_gpu(None) else None
        return st

    def _catch_up(self, st: IndexState, vt, lv: int) -> IndexState:
        """Apply the table's changes since the index was saved: add new vectors, drop deleted ones."""
        cur = self.storage.vector_ids(st.version)
        if len(cur) == 0:
            self.vectors_or_fail(st.version)
        pending = np.setdiff1d(cur, st.ids, assume_unique=True)
        gone = np.setdiff1d(st.ids, cur, assume_unique=True)
        meta = st.meta
        factory = None if meta.get("auto", True) else meta["factory"]
        stream = True if meta.get("streamed") else None  # built streamed: stays streamed; else the size rule
        n, dim = len(cur), meta["dim"]
        if len(pending) > REBUILD_PENDING * max(len(st.ids), 1) or (
            factory is None and sx.auto_factory(n, dim, sx.should_stream(n, dim, stream)) != meta["factory"]
        ):
            return self.rebuild(st.version, factory=factory, reason="grown", stream=stream)
        index = st.index
        if len(gone):
            try:
                index.remove_ids(fx.faiss.IDSelectorBatch(gone))
            except RuntimeError:  # HNSW cannot remove: the ids stay inside and are filtered out
                pass
        for part in chunks(pending, sx.STREAM_BATCH):  # a batch at a time: memory stays bounded on big stores
            pids, X = self.storage.read_vectors(st.version, part)
            index.add_with_ids(X, pids)
        ids = fx.index_ids(index)
        excluded = np.setdiff1d(ids, cur, assume_unique=True)
        if len(excluded) > REBUILD_DELETED * len(ids):
            return self.rebuild(st.version, factory=factory, reason="deleted", stream=stream)
        meta = {**meta, "lance_version": int(lv), "deleted": excluded.tolist(), "updated": now_iso()}
        new = IndexState(index, meta, ids, excluded, int(lv), st.version)
        new.gpu_index = fx.to_gpu(index, meta.get("params") or {}) if st.gpu_index is not None else None
        self._try_save(new)
        return new

    def rebuild(
        self, version: str, factory: str | None = None, gpu: bool | None = None, progress: bool = False,
        reason: str = "asked", stream: bool | None = None,
    ) -> IndexState:
        """Build `version`'s index from its vectors table now and save it. stream=True reads the table in batches
        (streaming_index: bounded memory, IVF-PQ when no factory is given), False reads it whole (faiss_index.build),
        None chooses by size (streaming_index.should_stream). A GPU, when used, builds in-memory indexes only."""
        use_gpu = self.want_gpu(gpu)
        vt = self.vectors_or_fail(version)
        lv, n, dim = vt.version, vt.count_rows(), self.storage.version_info(version)["dim"]
        streamed = sx.should_stream(n, dim, stream)
        with progress_bar(n, "indexing", progress, unit="vec", min_total=PROGRESS_MIN) as advance:
            if streamed:
                index, meta = sx.build_streamed(sx.TableVectors(vt, dim, lv), factory, progress=advance)
                ids = fx.index_ids(index)
            else:
                ids, X = self.storage.read_vectors(version)
                index, meta = fx.build(X, ids, factory, gpu=use_gpu, progress=advance)
                del X
        meta.update(
            version=version, lance_version=int(lv), deleted=[], built=now_iso(), reason=reason, streamed=streamed,
            problem=self._problems.pop(version, None),
        )
        st = IndexState(index, meta, ids, np.zeros(0, np.int64), int(lv), version)
        st.gpu_index = fx.to_gpu(index, meta["params"]) if use_gpu else None
        self._try_save(st)
        self._states[version] = st
        return st

    def _try_save(self, st: IndexState) -> None:
        """Save when the write lock is ours or free; a search never waits for a writer. Not saved (kept in memory)
        when the store is not writable by this user, or the disk refuses the file: the index is a cache."""
        try:
            with self.storage.write_lock(timeout=0):
                st.meta = fx.save(st.index, st.meta, self.storage.index_path(st.version))
        except (StoreLockedError, StoreNotWritableError):
            pass
        except OSError as e:
            warnings.warn(f"index not saved ({fx._first_line(e)}); it stays in memory for this process")

    # ---- descriptions ---------------------------------------------------------------------------
    def summary(self, st: IndexState) -> IndexSummary:
        m = st.meta
        return IndexSummary(
            factory=m["factory"], kind=m["kind"], auto=m["auto"], vectors=st.live, dim=m["dim"], params=m["params"],
            recall_at_10=m.get("recall_at_10"), seconds=m.get("seconds"),
            gpu=bool(m.get("gpu_built") or st.gpu_index is not None), path=str(self.storage.index_path(st.version)),
            streamed=bool(m.get("streamed")),
        )

    def info(self, version: str) -> IndexInfo | None:
        """What the sidecar on disk says (None when there is no readable one); never loads the index."""
        path = self.storage.index_path(version)
        try:
            meta = fx.read_meta(path)
        except fx.IndexFileError:
            return None
        fresh = meta.get("lance_version") == self.storage.table_version(vectors_table_name(version)) and path.is_file()
        return IndexInfo(
            factory=meta.get("factory"), kind=meta.get("kind"), auto=meta.get("auto"),
            vectors=meta.get("n", 0) - len(meta.get("deleted") or []), params=meta.get("params"),
            recall_at_10=meta.get("recall_at_10"), built=meta.get("built"), fresh=bool(fresh),
        )
