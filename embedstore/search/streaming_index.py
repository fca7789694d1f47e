"""Streaming index build: an IVF index trained on a sample of the vectors table, then filled batch by batch.

fx.build (faiss_index.py) takes the whole (N, D) float32 matrix, and the in-memory path of IndexCache.rebuild
(Storage.read_vectors, then fx.build) holds several copies of it: the Arrow table, the matrix, the matrix
without the held-out tuning rows. This module builds the same kind of index, with the same meta, without ever
holding the matrix:

  1. train on a seeded random sample of rows, read by offset from the table pinned at one table version:
     fx.TRAIN_PER_LIST (64) rows per IVF list, as fx.build does, so training memory grows as sqrt(N);
  2. read fx.TUNE_QUERIES held-out rows: the tuning queries;
  3. scan the table in STREAM_BATCH rows: add each batch to the index, and merge each batch's exact top 10
     for the queries into a running top 10 (exact ground truth in queries x 10 memory);
  4. raise nprobe (efSearch) until recall@10 on the held-out queries reaches fx.TARGET_RECALL, or, when the
     codes cap recall below it (PQ), comes within CEILING_GAP of the recall of a search of every list: the
     recall reached is what the meta's recall_at_10 records. Then add the queries.

Memory: the index (codes + ids) + the training sample + one batch + LanceDB's scan buffers; no N x D floats.

When (IndexCache.rebuild, and _catch_up's "rebuild when grown"): a build streams when asked (stream=True), or,
left to choose, when the store's float vectors take STREAM_MIN_BYTES (4 GiB: stream_min(dim) vectors, 2.1M at
512-d, 0.84M at the default 1280-d backbone) or more. The in-memory build's RSS grew by 4.2x the float matrix
(8.2 GB for 1M x 512-d, benchmarks/index_build.py), so 4 GiB of vectors would need ~17 GiB, and the IVF-Flat
index chosen below the threshold would itself hold the 4 GiB; the streamed build of 1M x 512-d grew by 1.4 GB
(0.13 GB of codes, ~1 GB of LanceDB scan buffers), and by 1.0-1.1 GB at 200k. Below the threshold IVF-Flat's
recall (0.98 on that data) is worth the memory.

Factory: a streamed build left to choose uses IVF-SQ8 (stream_factory): lists as fx.ivf_lists (the power of two
nearest sqrt(N), 256..65536) and 8-bit scalar-quantized vectors, dim bytes a vector (4x less than float32),
which keeps the recall promise: 0.974 recall@10 on 200k x 512-d synthetic clusters. PQ codes are 4-16x
smaller again but cap recall@10 far below TARGET_RECALL (dim/4 bytes: 0.51-0.59 on isotropic synthetic
clusters, 0.83 with a decaying spectrum; benchmarks/RESULTS.md, "Streaming index build"), and no refine step
is used (IndexRefineFlat would hold every float vector again), so PQ is for a user who asks for it when the
SQ8 index would not fit in memory: any explicit FAISS string streams the same way ("IVF65536,PQ128x4fs",
"OPQ64,IVF4096,PQ64", ...), and the recall it reached is in the meta.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from embedstore.arrowutil import to_matrix
from embedstore.search import faiss_index as fx

STREAM_MIN_BYTES = 4 << 30  # float32 vectors from which a build streams when not told (see the docstring)
STREAM_BATCH = fx.ADD_CHUNK  # rows read and added at a time (65536: 32 MiB of 128-d, 320 MiB of 1280-d floats)
CEILING_GAP = 0.01  # when TARGET_RECALL is out of reach, tuning settles for this much under the index's best
K = 10


# ---- when and what --------------------------------------------------------------------------------
def stream_min(dim: int) -> int:
    """Vectors from which a build streams when not told: STREAM_MIN_BYTES of float32."""
    return max(1, STREAM_MIN_BYTES // (4 * int(dim)))


def should_stream(n: int, dim: int, stream: bool | None = None) -> bool:
    """stream=True/False as asked; None: stream when n >= stream_min(dim)."""
    return bool(stream) if stream is not None else n >= stream_min(dim)


def stream_factory(n: int, dim: int) -> str:
    """The automatic factory of a streamed build: IVF-SQ8; under fx.FLAT_MAX vectors (too few to train 256
    lists) the exact fx.choose_factory one."""
    if n < fx.FLAT_MAX:
        return fx.choose_factory(n, dim)
    return f"IVF{fx.ivf_lists(n)},SQ8"


def auto_factory(n: int, dim: int, streamed: bool) -> str:
    """The factory chosen for n vectors when none is given, by build path (IndexCache.rebuild and _catch_up)."""
    return stream_factory(n, dim) if streamed else fx.choose_factory(n, dim)


# ---- reading the table ------------------------------------------------------------------------------
class TableVectors:
    """A vectors table (id, vector) pinned at one table version, read by row offsets or in batches through
    LanceDB's own API (take_offsets, a query's to_batches): no matrix of all rows is ever made."""

    def __init__(self, table, dim: int, lance_version: int | None = None):
        if lance_version is not None:
            table.checkout(int(lance_version))  # later commits (another process adding) are not seen
        self.table, self.dim = table, int(dim)
        self.n = int(table.count_rows())

    def take(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (m, D) float32) of the rows at these offsets (0..n-1), in offset order."""
        if len(offsets) == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        t = self.table.take_offsets([int(o) for o in np.sort(offsets)]).select(["id", "vector"]).to_arrow()
        return t.column("id").to_numpy().astype(np.int64), to_matrix(t.column("vector"), self.dim)

    def batches(self, batch_size: int = STREAM_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every row, batch_size rows at a time (a batch may be shorter at fragment ends)."""
        reader = self.table.search().select(["id", "vector"]).limit(None).to_batches(batch_size)
        for b in reader:
            yield b.column("id").to_numpy().astype(np.int64), to_matrix(b.column("vector"), self.dim)


# ---- building ---------------------------------------------------------------------------------------
class TopK:
    """Running exact top k (inner product) of queries Q over vectors seen batch by batch."""

    def __init__(self, Q: np.ndarray, k: int = K):
        self.Q, self.k = np.ascontiguousarray(Q, np.float32), k
        self.D = np.full((len(Q), k), -np.inf, np.float32)
        self.I = np.full((len(Q), k), -1, np.int64)

    def add(self, X: np.ndarray, ids: np.ndarray) -> None:
        if not len(self.Q) or not len(X):
            return
        D, pos = fx.exact_knn(self.Q, X, min(self.k, len(X)))
        D = np.concatenate([self.D, D], axis=1)
        I = np.concatenate([self.I, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)], axis=1)
        order = np.argsort(-D, axis=1, kind="stable")[:, : self.k]
        self.D, self.I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def build_streamed(
    src: TableVectors,
    factory: str | None = None,
    *,
    tune: bool = True,
    target_recall: float = fx.TARGET_RECALL,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
    batch_size: int = STREAM_BATCH,
) -> tuple[fx.faiss.Index, dict]:
    """Build an index over every row of `src` without holding them all (see the module docstring); returns
    (index, meta) with fx.build's meta keys plus streamed=True."""
    n, dim = src.n, src.dim
    auto = factory is None
    factory = factory or stream_factory(n, dim)
    index = fx.make_index(dim, factory)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    if not index.is_trained:
        ivf = fx.faiss.try_extract_index_ivf(index)
        nt = min(n, fx.TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 256))
        sample_ids, xt = src.take(np.random.default_rng(seed).choice(n, nt, replace=False))
        index, _ = fx._train(index, xt, sample_ids, factory, gpu=False, seed=seed, progress=None)
        del xt
    times["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned = tune and fx.index_kind(index) in ("ivf", "hnsw")
    hold_ids, Q = src.take(fx._holdout(n, seed) if tuned else np.zeros(0, np.int64))
    truth = TopK(Q)
    for ids, X in src.batches(batch_size):
        m = len(ids)
        if len(hold_ids):
            keep = ~np.isin(ids, hold_ids)
            ids, X = ids[keep], X[keep]
        if len(ids):
            index.add_with_ids(X, ids)
            truth.add(X, ids)
        if progress:
            progress(m)
    times["add"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if len(hold_ids):
        params, recall = tune_to_truth(index, Q, truth.I, target=target_recall)
        index.add_with_ids(Q, hold_ids)
    elif tuned:  # too few vectors to measure: search (nearly) everything, as fx.build
        ivf = fx.faiss.try_extract_index_ivf(index)
        params, recall = ({"nprobe": int(ivf.nlist)} if ivf is not None else {"efSearch": fx.EF_STEPS[-1]}), None
        fx.set_params(index, params)
    else:
        params, recall = fx.default_params(index), None
    times["tune"] = time.perf_counter() - t0
    meta = {
        "format": fx.FORMAT,
        "factory": factory,
        "auto": auto,
        "kind": fx.index_kind(index),
        "n": int(index.ntotal),
        "dim": int(dim),
        "params": params,
        "recall_at_10": recall,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "gpu_built": False,
        "streamed": True,
    }
    return index, meta


def tune_to_truth(
    index: fx.faiss.Index, Q: np.ndarray, truth: np.ndarray, *, target: float = fx.TARGET_RECALL, k: int = K
) -> tuple[dict, float | None]:
    """Smallest nprobe / efSearch whose recall@k of Q against `truth` (ids of the exact top k) reaches target, or,
    when the index cannot (its recall at the largest value, e.g. every list searched, is lower), comes within
    CEILING_GAP of that ceiling. Returns the params (also set on the index) and the recall measured with them."""
    kind = fx.index_kind(index)
    if kind == "ivf":
        nlist = fx.faiss.extract_index_ivf(index).nlist
        name, steps = "nprobe", [s for s in fx.NPROBE_STEPS if s < nlist] + [nlist]
    elif kind == "hnsw":
        name, steps = "efSearch", fx.EF_STEPS
    else:
        return fx.default_params(index), None

    def recall(v: int) -> float:
        fx.set_params(index, {name: v})
        return fx.recall_at_k(index.search(Q, k)[1], truth, k)

    ceiling = recall(steps[-1])
    goal = min(target, ceiling - CEILING_GAP)
    v, rec = steps[-1], ceiling
    for s in steps[:-1]:
        if (r := recall(s)) >= goal:
            v, rec = s, r
            break
    fx.set_params(index, {name: v})
    return {name: int(v)}, round(float(rec), 4)
