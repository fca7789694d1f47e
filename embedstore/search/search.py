"""Similarity search: nearest images to an image, a text, a stored id or a vector; near-duplicates.

Queries go through the version's FAISS index (search/index_cache.py); a `where` filter (SQL over
images + labels + predictions, evaluated by LanceDB) restricts the candidates, answered exactly when
few ids are allowed. Query images and texts are embedded by the version's backbone, the same numeric
path as ingest.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Callable

import lancedb
import numpy as np
import pyarrow as pa
from PIL import Image

from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError
from embedstore.ingest.backbones.base import Backbone
from embedstore.ingest.images import READ_ERRORS
from embedstore.results import DuplicatePair, Hit, IndexSummary
from embedstore.search import faiss_index as fx
from embedstore.search.index_cache import IndexCache, IndexState
from embedstore.storage import Storage

EXACT_FILTER_MAX = 20_000  # filtered queries over at most this many allowed ids are answered exactly
PADDED_K_MAX = 1024  # search_vectors pads rows to k columns up to this k; a larger k is cut to the live vectors
FILTER_COLUMNS = "id, path, hash, size, added, label, label_source, prediction, confidence, head"


class SearchService:
    """search, search_vectors, build_index, duplicates over the active version's index."""

    def __init__(self, storage: Storage, backbone_for: Callable[[str], Backbone], index: IndexCache):
        self.storage = storage
        self.backbone_for = backbone_for
        self.index = index
        self._filter_db = None
        self._filter_cache = None  # (table versions, in-memory table, its name)

    # ---- public API -----------------------------------------------------------------------
    def search(
        self,
        image=None,
        text: str | None = None,
        id: int | None = None,  # noqa: A002
        vector=None,
        k: int = 10,
        where: str | None = None,
    ) -> list[Hit]:
        """Nearest images to one query: an image (path or PIL), a text (CLIP backbones), a stored id or a vector.

        Returns up to k Hits, best first (score: cosine). A stored id's own
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
        st = self.index.state(self.storage.active_version)
        allowed = self._filter_ids(where) if where and str(where).strip() else None
        if allowed is not None and id is not None:
            allowed = allowed[allowed != int(id)]
        kk = min(k + 1 if id is not None else k, st.live)  # never ask FAISS for more than there is
        if kk < 1 or (allowed is not None and len(allowed) == 0):
            return []
        scores, found = self._search_one(st, q, kk, allowed)
        keep = [(float(s), int(i)) for s, i in zip(scores, found) if i >= 0 and (id is None or i != int(id))][:k]
        return self._hits(keep)

    def search_vectors(self, Q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Batch search: Q (N, D) L2-normalised float32 -> (scores (N, k) float32, ids (N, k) int64).

        A thin path to FAISS (no per-query Python). Rows with fewer than k results are padded with id -1
        (score -3.4e38) for k up to PADDED_K_MAX; a larger k is cut to the number of live vectors, so an
        absurd k never allocates more than the results.
        """
        k = _check_k(k)
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        if Q.ndim == 1:
            Q = Q[None]
        dim = self.storage.version_info()["dim"]
        if Q.ndim != 2 or Q.shape[1] != dim:
            raise InvalidArgumentError(f"query vectors must have shape (N, {dim}) for this store; got {Q.shape}")
        st = self.index.state(self.storage.active_version)
        kk = min(k, st.live)
        width = k if k <= PADDED_K_MAX else kk  # padded as documented; an absurd k gets what there is
        S = np.full((len(Q), width), -np.finfo(np.float32).max, np.float32)
        I = np.full((len(Q), width), -1, np.int64)
        if kk > 0:
            S[:, :kk], I[:, :kk] = st.search(Q, kk)
        return S, I

    def build_index(
        self, factory: str | None = None, gpu: bool | None = None, progress: bool = True, version: str | None = None,
        stream: bool | None = None,
    ) -> IndexSummary:
        """(Re)build the index of `version` (default: the active one) now; factory=None chooses by size (see
        embedstore.search.faiss_index). gpu=None uses a GPU when FAISS sees one, True requires it, False never.
        stream=True builds batch by batch from the table (bounded memory), None when the vectors take 4 GiB+."""
        self.index.want_gpu(gpu)  # fails at once when a GPU is required and absent
        with self.storage.write_lock():
            st = self.index.rebuild(version or self.storage.active_version, factory, gpu, progress, reason="asked",
                                    stream=stream)
        return self.index.summary(st)

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[DuplicatePair]:
        """Pairs of distinct images with cosine similarity >= threshold, best first.

        Each image's k nearest neighbours are checked (through the index), so a group of more than k
        near-identical images lists some of its pairs only.
        """
        if not 0.0 < float(threshold) <= 1.0:
            raise InvalidArgumentError(f"threshold must be in (0, 1], got {threshold}; e.g. --threshold 0.95")
        version = self.storage.active_version
        st = self.index.state(version)
        ids, X = self.storage.read_vectors(version)
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
        paths = self.storage.paths_for(np.concatenate([lo, hi]))
        return [
            DuplicatePair(int(lo[j]), paths.get(int(lo[j]), ""), int(hi[j]), paths.get(int(hi[j]), ""), round(float(s[j]), 6))
            for j in order
        ]

    # ---- queries --------------------------------------------------------------------------
    def _query_vector(self, image=None, text=None, id=None, vector=None) -> np.ndarray:  # noqa: A002
        dim = self.storage.version_info()["dim"]
        if vector is not None:
            q = np.asarray(vector, dtype=np.float32).reshape(-1)
            if q.shape[0] != dim:
                raise InvalidArgumentError(f"query vector has {q.shape[0]} values, this store's vectors have {dim}")
            norm = float(np.linalg.norm(q))
            if not np.isfinite(norm) or norm == 0:
                raise InvalidArgumentError("query vector is zero or not finite; pass an embedding of the store's backbone")
            return (q / norm)[None]
        if id is not None:
            version = self.storage.active_version
            self.index.vectors_or_fail(version)
            try:
                qid = int(id)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"id must be an integer image id, got {id!r}") from None
            ids, X = self.storage.read_vectors(version, [qid])
            if len(ids) == 0:
                raise InvalidArgumentError(f"no image with id {qid} in store {self.storage.root}; list ids with `embedstore search STORE --text/--image ... --json`")
            return X
        if text is not None:
            if not str(text).strip():
                raise InvalidArgumentError("text query is empty; pass words describing the images, e.g. --text 'a red car'")
            info = self.storage.version_info()
            if not info.get("text"):
                raise NotSupportedError(
                    f"backbone {info['name']} has no text tower, so text search is impossible; use a store made with an "
                    "openclip: backbone (e.g. openclip:ViT-B-32/laion2b_s34b_b79k), or query with --image / --id"
                )
            return self.backbone_for(self.storage.active_version).embed_texts([str(text)])
        if not hasattr(image, "convert"):
            p = Path(image).expanduser()
            if not p.is_file():
                raise InvalidArgumentError(f"query image {image} not found; pass an existing image file")
            image = str(p.resolve())
        bb = self.backbone_for(self.storage.active_version)  # its own errors (e.g. weights moved) pass through
        try:
            return bb.embed_images([image])
        except Image.DecompressionBombError as e:
            raise InvalidArgumentError(f"cannot read query image {image}: {fx._first_line(e)}") from None
        except READ_ERRORS as e:
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
        ids, X = self.storage.read_vectors(st.version, allowed)  # exact over the allowed vectors
        if len(ids) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        S, pos = fx.exact_knn(q, X, min(k, len(ids)))
        return S[0], ids[pos[0]]

    # ---- filters --------------------------------------------------------------------------
    def _filter_ids(self, where: str) -> np.ndarray:
        """Image ids matching a SQL `where` over images + labels + predictions (evaluated by LanceDB).

        The expression is checked to be one whole expression: LanceDB's parser stops at `;` and at text
        after a complete expression, silently ignoring the rest."""
        _check_where(where)
        tbl = self._filter_table()
        try:  # in parentheses, so trailing text is a parse error instead of being dropped
            res = tbl.search().where(f"({where})").select(["id"]).limit(None).to_arrow()
        except Exception as e:  # lance raises ValueError/RuntimeError with the parser's message
            msg = fx._first_line(e).replace("Invalid input, ", "")
            if (m := re.search(r"Expected: \), found: ([^\s)]+)", msg)) is not None:
                msg = f"unexpected {m.group(1)!r} after a complete expression (join conditions with AND / OR)"
            raise InvalidArgumentError(f"bad --where expression {where!r}: {msg}; columns: {FILTER_COLUMNS}") from None
        return np.unique(res.column("id").to_numpy().astype(np.int64))

    def _filter_table(self):
        """images ⟕ labels ⟕ predictions as an in-memory LanceDB table, cached by the tables' versions."""
        st = self.storage
        key = tuple((n, st.table_version(n)) for n in ("images", "labels", "predictions"))
        cached = self._filter_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        images = st.read_table("images", ["id", "path", "hash", "size", "added"])
        if images is None:
            raise EmptyInputError(f"store {st.root} has no images; add images first: embedstore add STORE IMAGES...")
        t = _join(images, _last_per_id(st.read_table("labels"), {"label": "label", "source": "label_source"}),
                  {"label": pa.string(), "label_source": pa.string()})
        t = _join(t, _last_per_id(st.read_table("predictions"), {"label": "prediction", "confidence": "confidence", "head": "head"}),
                  {"prediction": pa.string(), "confidence": pa.float32(), "head": pa.string()})
        if self._filter_db is None:
            self._filter_db = lancedb.connect("memory://")
        if cached is not None:
            try:
                self._filter_db.drop_table(cached[2])
            except Exception:
                pass
        name = f"f{uuid.uuid4().hex}"
        tbl = self._filter_db.create_table(name, data=t)
        self._filter_cache = (key, tbl, name)
        return tbl

    # ---- hits -----------------------------------------------------------------------------
    def _hits(self, pairs: list[tuple[float, int]]) -> list[Hit]:
        ids = [i for _, i in pairs]
        if not ids:
            return []
        st = self.storage
        paths = st.paths_for(ids)
        labels, preds = _id_map(st.read_ids("labels", ids, ["id", "label"])), _id_map(st.read_ids("predictions", ids, ["id", "label"]))
        return [Hit(i, paths.get(i, ""), round(s, 6), labels.get(i), preds.get(i)) for s, i in pairs]


# ---- helpers ------------------------------------------------------------------------------
def _id_map(t: pa.Table | None) -> dict[int, str]:
    return {} if t is None else dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))


def _check_k(k) -> int:
    """k as an int >= 1 (text such as "20" too); callers cap it at the number of vectors."""
    try:
        if isinstance(k, bool) or (isinstance(k, (float, np.floating)) and not float(k).is_integer()):
            raise ValueError
        k = int(k.strip() if isinstance(k, str) else k)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"k must be a whole number of results such as -k 20, got {k!r}") from None
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}; e.g. -k 20")
    return k


def _check_where(where) -> None:
    """One filter expression: no `;` outside quotes (LanceDB would ignore what follows it)."""
    quote = None
    for ch in where:
        if quote:
            quote = None if ch == quote else quote  # a doubled quote ('') closes and reopens: same result
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            raise InvalidArgumentError(
                f"bad --where expression {where!r}: ';' would end it and what follows would be ignored; "
                "pass one expression (join conditions with AND / OR)"
            )


def _last_per_id(table: pa.Table | None, rename: dict):
    """One row per id (the latest by `time` when present), columns renamed; None when no table."""
    if table is None:
        return None
    t = table
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
    if right is not None and right.num_rows:
        left = left.join(right, keys="id", join_type="left outer")
    for name, typ in columns.items():
        if name not in left.column_names:
            left = left.append_column(name, pa.nulls(left.num_rows, typ))
        elif left.schema.field(name).type != typ:
            left = left.set_column(left.column_names.index(name), name, left.column(name).cast(typ))
    return left


