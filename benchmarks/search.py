"""Search benchmark: a store of N synthetic clustered vectors (default 1M x 512) on CPU.

Measures, in one run:
  - index build time (store.build_index: automatic choice, training, adding, recall tuning) and memory
    (process RSS growth during the build, index file size);
  - recall@10 of store.search_vectors against exact search, on held-out queries from the same distribution;
  - batched QPS of store.search_vectors and of raw FAISS (index.search on the very same index object),
    and their ratio (target >= 0.9); exact brute-force QPS for reference.
Targets: recall@10 >= 0.95 at >= 1000 QPS on 2 cores. Prints a table, then one JSON line.

    python benchmarks/search.py                 # full size, several minutes
    python benchmarks/search.py --n 100000      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

import embedstore
from embedstore.search import faiss_index as fx
from synthetic_store import write_vectors

BACKBONE = "openclip:ViT-B-32/random"  # 512-d; only the store's metadata is used, no image is embedded


def make_store(root: Path, X: np.ndarray):
    """A store whose vectors table holds X (ids 0..N-1), written straight into LanceDB (no embedding)."""
    return write_vectors(embedstore.open(root, backbone=BACKBONE, device="cpu"), X, chunk=100_000)


def best_qps(fn, n_queries: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_queries / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000, help="batch size for the QPS measures")
    ap.add_argument("--truth", type=int, default=500, help="queries checked against exact search for recall")
    ap.add_argument("--clusters", type=int, default=None, help="default: 4 sqrt(n), i.e. more clusters than IVF lists")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit cluster centre")
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    ap.add_argument("--factory", default=None, help="FAISS factory string; default: the automatic choice")
    ap.add_argument("--store", type=Path, default=None, help="where to build the store (default: a temp dir)")
    args = ap.parse_args()

    fx.faiss.omp_set_num_threads(args.threads)
    proc = psutil.Process()
    clusters = args.clusters or max(8, int(4 * np.sqrt(args.n)))
    t0 = time.perf_counter()
    X = fx.clustered_vectors(args.n, args.dim, clusters=clusters, spread=args.spread, seed=0)
    Q = fx.clustered_vectors(args.queries, args.dim, clusters=clusters, spread=args.spread, seed=1)
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    _, truth = fx.exact_knn(Q[: args.truth], X, 10)  # ids are row numbers here
    t_exact = time.perf_counter() - t0
    exact_qps = args.truth / t_exact

    tmp = None
    root = args.store
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="es-bench-")
        root = Path(tmp.name) / "bench.es"
    t0 = time.perf_counter()
    store = make_store(root, X)
    t_write = time.perf_counter() - t0
    del X

    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    built = store.build_index(factory=args.factory, gpu=False, progress=True)
    t_build = time.perf_counter() - t0
    rss1 = proc.memory_info().rss
    index_bytes = os.path.getsize(built.path)

    raw = store.index.state(store.active_version).index  # the very index object search_vectors uses
    k = 10
    _, ids = store.search_vectors(Q[: args.truth], k)
    recall = fx.recall_at_k(ids, truth, k)
    raw_qps = store_qps = 0.0
    for _ in range(3):  # interleaved, best of 3 each: load on a shared machine drifts
        raw_qps = max(raw_qps, best_qps(lambda: raw.search(Q, k), len(Q), repeats=1))
        store_qps = max(store_qps, best_qps(lambda: store.search_vectors(Q, k), len(Q), repeats=1))

    res = {
        "benchmark": "search",
        "n": args.n,
        "dim": args.dim,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "factory": built.factory,
        "params": built.params,
        "tuned_recall_at_10": built.recall_at_10,
        "build_seconds": round(t_build, 2),
        "build_parts_seconds": built.seconds,
        "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
        "rss_mb": round(rss1 / 2**20, 1),
        "index_file_mb": round(index_bytes / 2**20, 1),
        "recall_at_10": round(recall, 4),
        "qps_store": round(store_qps, 1),
        "qps_raw_faiss": round(raw_qps, 1),
        "ratio_store_vs_raw": round(store_qps / raw_qps, 3),
        "qps_exact_bruteforce": round(exact_qps, 1),
        "batch": len(Q),
        "data_seconds": round(t_data, 2),
        "store_write_seconds": round(t_write, 2),
        "targets_met": bool(recall >= 0.95 and store_qps >= 1000 and store_qps / raw_qps >= 0.9),
    }
    from rich.console import Console
    from rich.table import Table

    t = Table("measure", "value", title=f"search benchmark: {args.n:,} x {args.dim}, {args.threads} threads")
    for key in ("factory", "params", "build_seconds", "build_parts_seconds", "rss_growth_mb", "index_file_mb",
                "recall_at_10", "qps_store", "qps_raw_faiss", "ratio_store_vs_raw", "qps_exact_bruteforce", "targets_met"):
        t.add_row(key, str(res[key]))
    Console(stderr=True).print(t)
    print(json.dumps(res))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
