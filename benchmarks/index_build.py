"""Index build benchmark: in-memory build (today's path) vs streaming build, same factory, same store.

A store of N synthetic clustered vectors (default 1M x 512, the CLIP dim) is written straight into LanceDB;
then each build runs in a fresh subprocess (so its peak RSS is its own) through IndexCache.rebuild:
  - memory: Storage.read_vectors + faiss_index.build (stream=False), the path every build took before;
  - stream: streaming_index.build_streamed (stream=True): trained on a sample, filled batch by batch.
Both use the same factory (default: the streaming one, IVF-PQ with dim/4 bytes of 4-bit codes). Measured per
build: wall time and its parts (train, add, tune), peak RSS (the child's VmHWM) and its growth
over the opened store, index file size and bytes per vector, add throughput, tuned nprobe, recall@10 measured
by the build (held-out rows) and through store.search_vectors on separate queries against exact search.
Prints a table, then one JSON line.

    python benchmarks/index_build.py                          # 1M x 512, several minutes on 2 cores
    python benchmarks/index_build.py --n 200000 --modes stream --factory 'IVF512,PQ64'
    python benchmarks/index_build.py --decay 1                # noise with a power-law spectrum
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import embedstore
from embedstore.search import faiss_index as fx
from embedstore.search import streaming_index as sx
from synthetic_store import write_vectors

BACKBONES = {512: "openclip:ViT-B-32/random", 1280: "offline:efficientnet_lite0"}  # only metadata is used


def make_vectors(n: int, dim: int, clusters: int, spread: float, decay: float, seed: int) -> np.ndarray:
    """decay 0: fx.clustered_vectors (isotropic noise: the hardest case for PQ). decay > 0: the same centres, noise
    with variances falling as i^-2decay along a fixed random basis (real embeddings put most variance in a few
    directions)."""
    if decay == 0:
        return fx.clustered_vectors(n, dim, clusters=clusters, spread=spread, seed=seed)
    fixed = np.random.default_rng(12345)
    C = fixed.standard_normal((clusters, dim)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    R = np.linalg.qr(fixed.standard_normal((dim, dim)))[0].astype(np.float32)
    s = np.arange(1, dim + 1, dtype=np.float32) ** -decay
    s *= spread / np.sqrt((s**2).sum())
    rng, out = np.random.default_rng(seed), np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = C[rng.integers(0, clusters, m)] + (rng.standard_normal((m, dim), dtype=np.float32) * s) @ R
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def proc_status(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes. VmHWM, unlike getrusage's ru_maxrss, starts afresh
    at exec: ru_maxrss keeps the parent's peak from before the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(args) -> None:
    """One build in this fresh process; prints its measures as JSON."""
    fx.faiss.omp_set_num_threads(args.threads)
    store = embedstore.open(args.store, create=False, device="cpu")
    rss0 = proc_status("VmRSS")
    t0 = time.perf_counter()
    st = store.index.rebuild(store.active_version, factory=args.factory, gpu=False, stream=args.child == "stream")
    wall = time.perf_counter() - t0
    peak = proc_status("VmHWM")
    q = np.load(args.qfile)
    _, found = store.search_vectors(q["Q"], 10)
    m = st.meta
    print(json.dumps({
        "mode": args.child, "factory": m["factory"], "streamed": m["streamed"], "n": m["n"], "wall_s": round(wall, 1),
        "seconds": m["seconds"], "peak_rss_mb": round(peak / 2**20), "rss_growth_mb": round((peak - rss0) / 2**20),
        "index_mb": round(m["faiss_bytes"] / 2**20, 1), "bytes_per_vector": round(m["faiss_bytes"] / m["n"], 1),
        "add_vectors_per_s": round(m["n"] / max(m["seconds"]["add"], 1e-9)), "params": m["params"],
        "tuned_recall_at_10": m["recall_at_10"], "recall_at_10": round(fx.recall_at_k(found, q["truth"], 10), 4),
    }))


def run_child(args, mode: str, qfile: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(args.store), "--qfile", str(qfile),
           "--threads", str(args.threads), "--factory", args.factory]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} build failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    ap.add_argument("--dim", type=int, default=512, choices=sorted(BACKBONES), help="the store's backbone sets it")
    ap.add_argument("--clusters", type=int, default=None, help="default: 4 sqrt(n)")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit cluster centre")
    ap.add_argument("--decay", type=float, default=0.0, help="noise spectrum exponent (0: isotropic)")
    ap.add_argument("--queries", type=int, default=500, help="queries checked against exact search")
    ap.add_argument("--factory", default=None, help="FAISS factory for both builds; default sx.stream_factory(n, dim)")
    ap.add_argument("--modes", default="memory,stream", help="builds to run, in order")
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads per build")
    ap.add_argument("--store", type=Path, default=None, help="store folder (reused when it holds n vectors)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--qfile", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.factory = args.factory or sx.stream_factory(args.n, args.dim)
    clusters = args.clusters or max(8, int(4 * math.sqrt(args.n)))
    tmp = tempfile.TemporaryDirectory(prefix="es-build-")
    args.store = args.store or Path(tmp.name) / "bench.es"

    t0 = time.perf_counter()
    X = make_vectors(args.n, args.dim, clusters, args.spread, args.decay, seed=0)
    Q = make_vectors(args.queries, args.dim, clusters, args.spread, args.decay, seed=1)
    _, truth = fx.exact_knn(Q, X, 10)  # ids are row numbers in the store
    qfile = Path(tmp.name) / "queries.npz"
    np.savez(qfile, Q=Q, truth=truth)
    fresh = not args.store.exists()
    store = embedstore.open(args.store, backbone=BACKBONES[args.dim], device="cpu")
    if not fresh and store.storage.vectors_table().count_rows() != args.n:
        raise SystemExit(f"{args.store} holds another number of vectors than --n {args.n}; pick another --store")
    if fresh:
        write_vectors(store, X, chunk=100_000)
    t_data = time.perf_counter() - t0
    del X, store

    builds = [run_child(args, mode, qfile) for mode in args.modes.split(",")]
    res = {"benchmark": "index_build", "n": args.n, "dim": args.dim, "clusters": clusters, "spread": args.spread,
           "decay": args.decay, "threads": args.threads, "cpu_count": os.cpu_count(), "factory": args.factory,
           "float_matrix_mb": round(args.n * args.dim * 4 / 2**20), "data_seconds": round(t_data, 1),
           "builds": builds}
    from rich.console import Console
    from rich.table import Table

    t = Table("measure", *[b["mode"] for b in builds],
              title=f"index build: {args.n:,} x {args.dim}, {args.factory}, {args.threads} thread(s)")
    for key in ("wall_s", "seconds", "peak_rss_mb", "rss_growth_mb", "index_mb", "bytes_per_vector",
                "add_vectors_per_s", "params", "tuned_recall_at_10", "recall_at_10"):
        t.add_row(key, *[str(b[key]) for b in builds])
    Console(stderr=True).print(t)
    print(json.dumps(res))
    tmp.cleanup()


if __name__ == "__main__":
    main()
