"""Similarity search over a store: the SearchMixin the Store inherits.

The FAISS index is a cache of the active version's vectors table (LanceDB is the source of truth):

    STORE/index/<version>.faiss   the index (image ids inside: IVF natively, others via IndexIDMap)
    STORE/index/<version>.json    sidecar: factory, auto?, tuned params + measured recall, the LanceDB
                                  table version it matches, ids still inside but deleted, file size

Before each search the sidecar's table version is compared with the table's. When they differ the
index is brought up to date incrementally: vectors whose ids it lacks are added, ids no longer in the
table are removed (or, for HNSW which cannot remove, listed and filtered out with an IDSelector), and
the file is saved when the write lock is free. A missing, corrupt or mismatched file, a big change,
or growth past the size where another index type is chosen, means a rebuild from LanceDB.
`add`/`remove` run the same update through `_after_vectors_changed`, so the file on disk stays fresh.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from embedstore.search import faiss_index as fx
from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError, StoreLockedError

EXACT_FILTER_MAX = 20_000  # filtered queries over at most this many allowed ids are answered exactly
REBUILD_PENDING = 0.5  # rebuild instead of adding when new vectors exceed this fraction of the index
REBUILD_DELETED = 0.2  # rebuild when ids deleted but still inside (HNSW) exceed this fraction
READ_CHUNK = 5000
FILTER_COLUMNS = "id, path, hash, size, added, label, label_source, prediction, confidence, head"


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
            keep = np.ascontiguousarray(allowed, np.int64)
            sel = fx.faiss.IDSelectorBatch(keep)
        else:
            if self._excl_sel is None:
                inner = fx.faiss.IDSelectorBatch(self.excluded)
                self._excl_sel = fx.faiss.IDSelectorNot(inner)
                self._excl_sel.referenced_objects = [inner]
            sel = self._excl_sel
        params = fx.search_params(self.index, self.meta.get("params") or {}, sel, boost)
        return self.index.search(Q, k, params=params)


class SearchMixin:
    """search, search_vectors, build_index, duplicates; the index file is kept in step with add/remove."""

    # ---- public API -----------------------------------------------------------------------
    def search(
        self,
        image=None,
        text: str | None = None,
        id: int | None = None,  # noqa: A002
        vector=None,
        k: int = 10,
        where: str | None = None,
    ) -> list[dict]:
        """Nearest images to one query: an image (path or PIL), a text (CLIP backbones), a stored id or a vector.

        Returns up to k hits, best first: {id, path, score (cosine), label, prediction}. A stored id's own
        image is left out of its results. `where` is a SQL filter over image metadata and labels (columns:
        id, path, hash, size, added, label, label_source, prediction, confidence, head); k hits still come
        back when at least k images match.
        """
        given = [name for name, v in (("image", image), ("text", text), ("id", id), ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise InvalidArgumentError(
                "give exactly one query: image=, text=, id= or vector= (CLI: --image FILE, --text TEXT or --id N)"
                + (f"; got {', '.join(given)}" if given else "")
            )
        k = _check_k(k)
        q = self._query_vector(image=image, text=text, id=id, vector=vector)
        st = self._index_state()
        allowed = self._filter_ids(where) if where else None
        if allowed is not None and id is not None:
            allowed = allowed[allowed != int(id)]
        kk = k + 1 if id is not None else k
        if allowed is not None and len(allowed) == 0:
            return []
        scores, found = self._search_one(st, q, kk, allowed)
        keep = [(float(s), int(i)) for s, i in zip(scores, found) if i >= 0 and (id is None or i != int(id))][:k]
        return self._hits(keep)

    def search_vectors(self, Q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Batch search: Q (N, D) L2-normalised float32 -> (scores (N, k) float32, ids (N, k) int64).

        A thin path to FAISS (no per-query Python). Rows with fewer than k results are padded with id -1.
        """
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None]
        dim = self.version_info()["dim"]
        if Q.ndim != 2 or Q.shape[1] != dim:
            raise InvalidArgumentError(f"query vectors must have shape (N, {dim}) for this store; got {Q.shape}")
        return self._index_state().search(Q, _check_k(k))

    def build_index(self, factory: str | None = None, gpu: bool | None = None, progress: bool = True) -> dict:
        """(Re)build the index of the active version now; factory=None chooses by size (see embedstore.search.faiss_index).

        gpu=None uses a GPU when FAISS sees one, True requires it, False never uses it. Returns a summary.
        """
        use_gpu = self._want_gpu(gpu)
        with self.write_lock():
            vt = self._vectors_table_or_fail()
            st = self._rebuild(vt, factory=factory, gpu=use_gpu, progress=progress, reason="asked")
        return self._summary(st)

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[dict]:
        """Pairs of distinct images with cosine similarity >= threshold, best first.

        Each image's k nearest neighbours are checked (through the index), so a group of more than k
        near-identical images lists some of its pairs only.
        """
        if not 0.0 < float(threshold) <= 1.0:
            raise InvalidArgumentError(f"threshold must be in (0, 1], got {threshold}; e.g. --threshold 0.95")
        st = self._index_state()
        vt = self._vectors_table_or_fail()
        ids, X = _read_all(vt)
        if len(ids) < 2:
            return []
        kk = min(len(ids), _check_k(k) + 1)
        S, I = st.search(X, kk)
        mask = (I >= 0) & (I != ids[:, None]) & (S >= threshold)
        rows, cols = np.nonzero(mask)
        a, b, s = ids[rows], I[rows, cols], S[rows, cols]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        order = np.lexsort((-s, hi, lo))
        lo, hi, s = lo[order], hi[order], s[order]
        first = np.ones(len(lo), bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        lo, hi, s = lo[first], hi[first], s[first]
        order = np.argsort(-s, kind="stable")
        paths = self._paths(np.concatenate([lo, hi]))
        return [
            {"id_a": int(lo[j]), "path_a": paths.get(int(lo[j]), ""), "id_b": int(hi[j]), "path_b": paths.get(int(hi[j]), ""),
             "score": round(float(s[j]), 6)}
            for j in order
        ]

    def info_index(self) -> dict:
        """The index line of store.info(): factory, vectors, tuned params, recall, fresh (matches the table)."""
        path = self._index_path()
        try:
            meta = fx.read_meta(path)
        except fx.IndexFileError:
            return {"index": None}
        vt = self.vectors_table()
        fresh = vt is not None and meta.get("lance_version") == vt.version and path.is_file()
        return {
            "index": {
                "factory": meta.get("factory"),
                "kind": meta.get("kind"),
                "auto": meta.get("auto"),
                "vectors": meta.get("n", 0) - len(meta.get("deleted") or []),
                "params": meta.get("params"),
                "recall_at_10": meta.get("recall_at_10"),
                "built": meta.get("built"),
                "fresh": bool(fresh),
            }
        }

    def _after_vectors_changed(self) -> None:
        """After add/remove (under the write lock): bring an existing index file up to date."""
        try:
            if self.__dict__.get("_idx_state") is not None or fx.sidecar_path(self._index_path()).exists():
                self._index_state(build_missing=False)
        except Exception as e:  # the index is a cache: drop it, the next search rebuilds it
            if not isinstance(e, EmptyInputError):
                warnings.warn(f"index update failed ({fx._first_line(e)}); it will be rebuilt on the next search")
            self.__dict__["_idx_state"] = None
            fx.sidecar_path(self._index_path()).unlink(missing_ok=True)
        hook = getattr(super(), "_after_vectors_changed", None)
        if hook is not None:
            hook()

    # ---- the index state ------------------------------------------------------------------
    def _index_path(self, version: str | None = None) -> Path:
        return self.root / "index" / f"{version or self.active_version}.faiss"

    def _vectors_table_or_fail(self):
        vt = self.vectors_table()
        if vt is None or vt.count_rows() == 0:
            raise EmptyInputError(f"store {self.root} has no vectors to search; add images first: embedstore add STORE IMAGES...")
        return vt

    def _index_state(self, build_missing: bool = True) -> IndexState | None:
        """The index of the active version, in step with its vectors table (loaded, updated or rebuilt)."""
        st = self.__dict__.get("_idx_state")
        stamp = self._table_stamp()
        if st is not None and stamp is not None and st.stamp == stamp and st.version == self.active_version:
            return st  # the table's version directory is untouched: nothing changed (the fast path)
        vt = self.vectors_table()
        if vt is None:
            raise EmptyInputError(f"store {self.root} has no vectors to search; add images first: embedstore add STORE IMAGES...")
        lv = vt.version
        if st is not None and st.version == self.active_version and st.lance_version == lv:
            st.stamp = stamp
            return st
        if st is None or st.version != self.active_version:
            st = self._load_state()
        if st is None:
            if not build_missing:
                return None
            if vt.count_rows() == 0:
                raise EmptyInputError(f"store {self.root} has no vectors to search; add images first: embedstore add STORE IMAGES...")
            st = self._rebuild(vt, factory=None, gpu=self._want_gpu(None), progress=False, reason="missing")
        elif st.lance_version != lv:
            st = self._catch_up(st, vt, lv)
        st.stamp = stamp if st.lance_version == lv else None
        self.__dict__["_idx_state"] = st
        return st

    def _table_stamp(self) -> tuple | None:
        """(inode, mtime) of the vectors table's _versions directory: every LanceDB commit adds a file there.

        None (always check the table version) when missing or changed in the last 2 seconds, so coarse
        file-system clocks cannot hide a commit.
        """
        try:
            s = os.stat(self.root / "lance" / f"vectors_{self.active_version}.lance" / "_versions")
        except OSError:
            return None
        if time.time_ns() - s.st_mtime_ns < 2_000_000_000:
            return None
        return (s.st_ino, s.st_mtime_ns)

    def _load_state(self) -> IndexState | None:
        path = self._index_path()
        dim = self.version_info()["dim"]
        try:
            index, meta = fx.load(path, dim)
        except fx.IndexFileError as e:
            self.__dict__["_idx_problem"] = str(e)
            return None
        ids = fx.index_ids(index)
        excluded = np.asarray(meta.get("deleted") or [], np.int64)
        st = IndexState(index, meta, ids, excluded, int(meta.get("lance_version", -1)), self.active_version)
        st.gpu_index = fx.to_gpu(index, meta.get("params") or {}) if self._want_gpu(None) else None
        return st

    def _catch_up(self, st: IndexState, vt, lv: int) -> IndexState:
        """Apply the table's changes since the index was saved: add new vectors, drop deleted ones."""
        cur = np.sort(vt.search().select(["id"]).limit(None).to_arrow().column("id").to_numpy().astype(np.int64))
        if len(cur) == 0:
            raise EmptyInputError(f"store {self.root} has no vectors to search; add images first: embedstore add STORE IMAGES...")
        pending = np.setdiff1d(cur, st.ids, assume_unique=True)
        gone = np.setdiff1d(st.ids, cur, assume_unique=True)
        meta = st.meta
        factory = None if meta.get("auto", True) else meta["factory"]
        if (
            len(pending) > REBUILD_PENDING * max(len(st.ids), 1)
            or (factory is None and fx.choose_factory(len(cur), meta["dim"]) != meta["factory"])
        ):
            return self._rebuild(vt, factory=factory, gpu=self._want_gpu(None), progress=False, reason="grown")
        index = st.index
        if len(gone):
            try:
                index.remove_ids(fx.faiss.IDSelectorBatch(gone))
            except RuntimeError:  # HNSW cannot remove: the ids stay inside and are filtered out
                pass
        if len(pending):
            pids, X = _read_vectors(vt, pending)
            index.add_with_ids(X, pids)
        ids = fx.index_ids(index)
        excluded = np.setdiff1d(ids, cur, assume_unique=True)
        if len(excluded) > REBUILD_DELETED * len(ids):
            return self._rebuild(vt, factory=factory, gpu=self._want_gpu(None), progress=False, reason="deleted")
        meta = {**meta, "lance_version": int(lv), "deleted": excluded.tolist(), "updated": _now()}
        new = IndexState(index, meta, ids, excluded, int(lv), st.version)
        new.gpu_index = fx.to_gpu(index, meta.get("params") or {}) if st.gpu_index is not None else None
        self._try_save(new)
        return new

    def _rebuild(self, vt, factory: str | None, gpu: bool, progress: bool, reason: str) -> IndexState:
        lv = vt.version
        ids, X = _read_all(vt)
        if len(ids) == 0:
            raise EmptyInputError(f"store {self.root} has no vectors to index; add images first: embedstore add STORE IMAGES...")
        with _progress(len(ids), "indexing", progress) as advance:
            index, meta = fx.build(X, ids, factory, gpu=gpu, progress=advance)
        meta.update(
            version=self.active_version, lance_version=int(lv), deleted=[], built=_now(), reason=reason,
            problem=self.__dict__.pop("_idx_problem", None),
        )
        st = IndexState(index, meta, ids, np.zeros(0, np.int64), int(lv), self.active_version)
        st.gpu_index = fx.to_gpu(index, meta["params"]) if gpu else None
        self._try_save(st)
        self.__dict__["_idx_state"] = st
        return st

    def _try_save(self, st: IndexState) -> None:
        """Save when the write lock is ours or free; a search never waits for a writer."""
        try:
            with self.write_lock(timeout=0):
                st.meta = fx.save(st.index, st.meta, self._index_path(st.version))
        except StoreLockedError:
            pass

    def _want_gpu(self, gpu: bool | None) -> bool:
        if gpu:
            fx.require_gpu()
            return True
        if gpu is None:
            return self.device_request != "cpu" and fx.gpu_available()
        return False

    def _summary(self, st: IndexState) -> dict:
        m = st.meta
        return {
            "factory": m["factory"],
            "kind": m["kind"],
            "auto": m["auto"],
            "vectors": int(len(st.ids) - len(st.excluded)),
            "dim": m["dim"],
            "params": m["params"],
            "recall_at_10": m.get("recall_at_10"),
            "seconds": m.get("seconds"),
            "gpu": bool(m.get("gpu_built") or st.gpu_index is not None),
            "path": str(self._index_path(st.version)),
        }

    # ---- queries --------------------------------------------------------------------------
    def _query_vector(self, image=None, text=None, id=None, vector=None) -> np.ndarray:  # noqa: A002
        dim = self.version_info()["dim"]
        if vector is not None:
            q = np.asarray(vector, dtype=np.float32).reshape(-1)
            if q.shape[0] != dim:
                raise InvalidArgumentError(f"query vector has {q.shape[0]} values, this store's vectors have {dim}")
            norm = float(np.linalg.norm(q))
            if not np.isfinite(norm) or norm == 0:
                raise InvalidArgumentError("query vector is zero or not finite; pass an embedding of the store's backbone")
            return (q / norm)[None]
        if id is not None:
            vt = self._vectors_table_or_fail()
            try:
                qid = int(id)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"id must be an integer image id, got {id!r}") from None
            ids, X = _read_vectors(vt, np.array([qid], np.int64))
            if len(ids) == 0:
                raise InvalidArgumentError(f"no image with id {qid} in store {self.root}; list ids with `embedstore search STORE --text/--image ... --json`")
            return X
        if text is not None:
            if not str(text).strip():
                raise InvalidArgumentError("text query is empty; pass words describing the images, e.g. --text 'a red car'")
            info = self.version_info()
            if not info.get("text"):
                raise NotSupportedError(
                    f"backbone {info['name']} has no text tower, so text search is impossible; use a store made with an "
                    "openclip: backbone (e.g. openclip:ViT-B-32/laion2b_s34b_b79k), or query with --image / --id"
                )
            return self.backbone.embed_texts([str(text)])
        if not hasattr(image, "convert"):
            p = Path(image).expanduser()
            if not p.is_file():
                raise InvalidArgumentError(f"query image {image} not found; pass an existing image file")
            image = str(p.resolve())
        try:
            return self.backbone.embed_images([image])
        except (OSError, ValueError, SyntaxError) as e:
            raise InvalidArgumentError(f"cannot read query image {image}: {fx._first_line(e)}; pass a JPEG/PNG/... file") from None

    def _search_one(self, st: IndexState, q: np.ndarray, k: int, allowed: np.ndarray | None):
        """One query, k results: exact over the allowed ids when few, else FAISS with an IDSelector."""
        if allowed is None:
            S, I = st.search(q, k)
            return S[0], I[0]
        allowed = np.intersect1d(allowed, st.ids, assume_unique=False)
        if len(st.excluded):
            allowed = np.setdiff1d(allowed, st.excluded, assume_unique=True)
        want = min(k, len(allowed))
        if st.meta.get("kind") != "flat" and len(allowed) > EXACT_FILTER_MAX:
            S, I = st.search(q, k, allowed=allowed, boost=2.0)
            if int((I[0] >= 0).sum()) >= want:
                return S[0], I[0]
        elif st.meta.get("kind") == "flat":
            S, I = st.search(q, k, allowed=allowed)
            return S[0], I[0]
        ids, X = _read_vectors(self.vectors_table(), allowed)  # exact over the allowed vectors
        if len(ids) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        S, pos = fx.exact_knn(q, X, min(k, len(ids)))
        return S[0], ids[pos[0]]

    # ---- filters --------------------------------------------------------------------------
    def _filter_ids(self, where: str) -> np.ndarray:
        """Image ids matching a SQL `where` over images + labels + predictions (evaluated by LanceDB)."""
        tbl = self._filter_table()
        try:
            res = tbl.search().where(where).select(["id"]).limit(None).to_arrow()
        except Exception as e:  # lance raises ValueError/RuntimeError with the parser's message
            msg = fx._first_line(e).replace("Invalid input, ", "")
            raise InvalidArgumentError(f"bad --where expression {where!r}: {msg}; columns: {FILTER_COLUMNS}") from None
        return np.unique(res.column("id").to_numpy().astype(np.int64))

    def _filter_table(self):
        """images ⟕ labels ⟕ predictions as an in-memory LanceDB table, cached by the tables' versions."""
        import lancedb
        import pyarrow as pa

        tables = {name: self.table(name) for name in ("images", "labels", "predictions")}
        key = tuple((n, None if t is None else t.version) for n, t in tables.items())
        cached = self.__dict__.get("_filter_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        if tables["images"] is None:
            raise EmptyInputError(f"store {self.root} has no images; add images first: embedstore add STORE IMAGES...")
        t = tables["images"].to_arrow().select(["id", "path", "hash", "size", "added"])
        t = _join(t, _last_per_id(tables["labels"], {"label": "label", "source": "label_source"}),
                  {"label": pa.string(), "label_source": pa.string()})
        t = _join(t, _last_per_id(tables["predictions"], {"label": "prediction", "confidence": "confidence", "head": "head"}),
                  {"prediction": pa.string(), "confidence": pa.float32(), "head": pa.string()})
        db = self.__dict__.get("_filter_db")
        if db is None:
            db = self.__dict__["_filter_db"] = lancedb.connect("memory://")
        if cached is not None:
            try:
                db.drop_table(cached[2])
            except Exception:
                pass
        name = f"f{uuid.uuid4().hex}"
        tbl = db.create_table(name, data=t)
        self.__dict__["_filter_cache"] = (key, tbl, name)
        return tbl

    # ---- hits -----------------------------------------------------------------------------
    def _paths(self, ids: Sequence[int]) -> dict[int, str]:
        ids = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        for chunk in _chunks(ids):
            t = self.read_table("images", ["id", "path"], where=_in(chunk))
            if t is not None:
                out.update(zip(t.column("id").to_pylist(), t.column("path").to_pylist()))
        return out

    def _hits(self, pairs: list[tuple[float, int]]) -> list[dict]:
        ids = [i for _, i in pairs]
        if not ids:
            return []
        paths = self._paths(ids)
        labels, preds = {}, {}
        if self.table("labels") is not None:
            t = self.read_table("labels", ["id", "label"], where=_in(ids))
            labels = dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))
        if self.table("predictions") is not None:
            t = self.read_table("predictions", ["id", "label"], where=_in(ids))
            preds = dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))
        return [
            {"id": i, "path": paths.get(i, ""), "score": round(s, 6), "label": labels.get(i), "prediction": preds.get(i)}
            for s, i in pairs
        ]


# ---- helpers ------------------------------------------------------------------------------
def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_k(k) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}") from None
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    return k


def _in(ids) -> str:
    return f"id IN ({', '.join(str(int(i)) for i in ids)})"


def _chunks(seq, n: int = READ_CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _matrix(t) -> tuple[np.ndarray, np.ndarray]:
    from embedstore.store import _to_matrix

    col = t.column("vector")
    dim = col.type.list_size
    return t.column("id").to_numpy().astype(np.int64), np.ascontiguousarray(_to_matrix(col, dim))


def _read_all(vt) -> tuple[np.ndarray, np.ndarray]:
    return _matrix(vt.to_arrow())


def _read_vectors(vt, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids and vectors of the given ids (those present), read from LanceDB in chunks."""
    parts = [vt.search().where(_in(c)).select(["id", "vector"]).limit(None).to_arrow() for c in _chunks(np.asarray(ids))]
    import pyarrow as pa

    return _matrix(pa.concat_tables(parts)) if parts else (np.zeros(0, np.int64), np.zeros((0, 0), np.float32))


def _last_per_id(table, rename: dict):
    """One row per id (the latest by `time` when present), columns renamed; None when no table."""
    if table is None:
        return None
    import pyarrow as pa

    t = table.to_arrow()
    cols = [c for c in rename if c in t.column_names]
    if "time" in t.column_names and t.num_rows:
        t = t.sort_by([("time", "ascending")])
    ids = t.column("id").to_numpy()
    _, last = np.unique(ids[::-1], return_index=True)
    rows = np.sort(len(ids) - 1 - last)
    t = t.take(pa.array(rows, pa.int64()))
    return pa.table({"id": t.column("id"), **{rename[c]: t.column(c) for c in cols}})


def _join(left, right, columns: dict):
    """Left join on id; the listed columns exist (null) even when `right` is None or lacks them."""
    import pyarrow as pa

    if right is not None and right.num_rows:
        left = left.join(right, keys="id", join_type="left outer")
    for name, typ in columns.items():
        if name not in left.column_names:
            left = left.append_column(name, pa.nulls(left.num_rows, typ))
        elif left.schema.field(name).type != typ:
            left = left.set_column(left.column_names.index(name), name, left.column(name).cast(typ))
    return left


class _progress:
    """A rich progress bar (items/s) for long builds; silent when disabled."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled and total >= 50_000

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from embedstore.store import _progress_bar

        self._cm = _progress_bar(self.total, self.label, True)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        if self.enabled:
            return self._cm.__exit__(*exc)
        return False
