"""FAISS indexes over numpy arrays: automatic choice by size, recall tuning, save/load, GPU.

Plain functions (as faiss.contrib does); embedstore/search.py ties them to a store. Every index
holds image ids, not row numbers: IVF indexes store them natively, the others are wrapped in an
IndexIDMap. Vectors are L2-normalised, so inner product (METRIC_INNER_PRODUCT) is cosine similarity.

Automatic choice (`choose_factory`), in the spirit of autofaiss but sized for small machines:

    N <  FLAT_MAX (20k)      "Flat"           exact, brute force (BLAS); no training, no tuning
    N <  HNSW_MAX (100k)     "HNSW32,Flat"    graph; no training; efSearch tuned
    N >= HNSW_MAX            "IVF{L},Flat"    L = power of two nearest sqrt(N) (256..65536); nprobe tuned

After a build, the search parameter (nprobe / efSearch) is raised step by step until recall@10
against exact search, measured with a held-out sample of the vectors as queries, reaches TARGET_RECALL: the
recall figure is stored with the index, so "how approximate is it" is a number, not a guess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from embedstore.errors import InvalidArgumentError, NotSupportedError

FLAT_MAX = 20_000
HNSW_MAX = 100_000
HNSW_M = 32
IVF_MIN_LISTS, IVF_MAX_LISTS = 256, 65536
TRAIN_PER_LIST = 64  # k-means training sample: 64 vectors per list (FAISS warns under 39)
KMEANS_ITER = 10
TARGET_RECALL = 0.97  # tuning target on the sample; the product promise is >= 0.95
TUNE_QUERIES = 256
ADD_CHUNK = 65536
FORMAT = 2  # sidecar format; 2 = carries the sha256 of the .faiss file (1 had only its size)
NPROBE_STEPS = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096]
EF_STEPS = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
GPU_MAX_K = 2048  # FAISS-GPU's k limit
FACTORY_HINT = "examples: 'Flat', 'HNSW32,Flat', 'IVF1024,Flat', 'IVF4096,SQ8', 'OPQ32,IVF1024,PQ32'"


class IndexFileError(Exception):
    """An index file that is missing, unreadable or does not match its sidecar (internal: triggers a rebuild)."""


# ---- choosing and building --------------------------------------------------------------------
def ivf_lists(n: int) -> int:
    """IVF list count for n vectors: the power of two nearest sqrt(n), within [256, 65536]."""
    return int(min(IVF_MAX_LISTS, max(IVF_MIN_LISTS, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def choose_factory(n: int, dim: int | None = None) -> str:
    """The FAISS factory string used for n vectors when none is given (see the module docstring)."""
    if n < FLAT_MAX:
        return "Flat"
    if n < HNSW_MAX:
        return f"HNSW{HNSW_M},Flat"
    return f"IVF{ivf_lists(n)},Flat"


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index for `factory` that accepts ids (IVF natively, others via IndexIDMap)."""
    try:
        base = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidArgumentError(f"bad FAISS factory string {factory!r} ({_first_line(e)}); {FACTORY_HINT}") from None
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is not None and isinstance(ivf := faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # codes search never uses; it made PQ training 20-40x slower
    if isinstance(base, (faiss.IndexIDMap, faiss.IndexIDMap2)) or ivf is not None:
        return base
    return faiss.IndexIDMap(base)


def index_kind(index: faiss.Index) -> str:
    """'ivf', 'hnsw', 'flat' or 'other' (e.g. PQ without IVF)."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return "other"


def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (int64), in no particular order."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        inv = ivf.invlists
        parts = [
            faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
            for lst in range(inv.nlist)
            if inv.list_size(lst)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return np.arange(index.ntotal, dtype=np.int64)


def build(
    X: np.ndarray,
    ids: np.ndarray,
    factory: str | None = None,
    *,
    gpu: bool = False,
    tune: bool = True,
    target_recall: float = TARGET_RECALL,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> tuple[faiss.Index, dict]:
    """Build an index over X (N, D) float32 with ids (N,); returns (index, meta).

    meta: factory, auto, kind, n, dim, params ({"nprobe": ..} / {"efSearch": ..}), recall (measured
    recall@10 at those params, None for exact indexes), seconds (train, add, tune), gpu.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = X.shape
    auto = factory is None
    factory = factory or choose_factory(n, dim)
    index = make_index(dim, factory)
    times: dict[str, float] = {}
    used_gpu = False

    t0 = time.perf_counter()
    if not index.is_trained:
        index, used_gpu = _train(index, X, ids, factory, gpu=gpu, seed=seed, progress=progress)
    times["train"] = time.perf_counter() - t0

    # hold a sample out of the index, tune the search parameter with it as queries, then add it
    hold = _holdout(n, seed) if tune and index_kind(index) in ("ivf", "hnsw") else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(n), hold) if len(hold) else None
    t0 = time.perf_counter()
    if not used_gpu:
        Xa, ida = (X, ids) if rest is None else (X[rest], ids[rest])
        for i in range(0, len(Xa), ADD_CHUNK):
            index.add_with_ids(Xa[i : i + ADD_CHUNK], ida[i : i + ADD_CHUNK])
            if progress:
                progress(min(ADD_CHUNK, len(Xa) - i))
    elif len(hold):
        index.remove_ids(faiss.IDSelectorBatch(ids[hold]))  # the GPU build added everything
    times["add"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if len(hold):
        params, recall = tune_params(index, X[hold], X[rest], ids[rest], target=target_recall)
        index.add_with_ids(X[hold], ids[hold])
    elif tune and index_kind(index) in ("ivf", "hnsw"):  # too few vectors to measure: search (nearly) everything
        ivf = faiss.try_extract_index_ivf(index)
        params, recall = ({"nprobe": int(ivf.nlist)} if ivf is not None else {"efSearch": EF_STEPS[-1]}), None
        set_params(index, params)
    else:
        params, recall = default_params(index), None
    times["tune"] = time.perf_counter() - t0
    meta = {
        "format": FORMAT,
        "factory": factory,
        "auto": auto,
        "kind": index_kind(index),
        "n": int(index.ntotal),
        "dim": int(dim),
        "params": params,
        "recall_at_10": recall,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "gpu_built": used_gpu,
    }
    return index, meta


def _train(index, X: np.ndarray, ids: np.ndarray, factory: str, *, gpu: bool, seed: int, progress) -> tuple[faiss.Index, bool]:
    """Train on a seeded sample of X (TRAIN_PER_LIST per list); on the GPU when asked (which fills it too: used_gpu)."""
    n = len(X)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if n < ivf.nlist:
            raise InvalidArgumentError(
                f"factory {factory!r} needs at least {ivf.nlist} vectors to train its lists, the store has {n}; "
                f"use fewer lists (e.g. 'IVF{max(1, 2 ** int(math.log2(max(1, n // 39))))},Flat') or 'Flat'"
            )
        ivf.cp.niter = KMEANS_ITER
        ivf.cp.seed = seed
    rng = np.random.default_rng(seed)
    nt = min(n, TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 256))
    xt = X if nt == n else X[np.sort(rng.choice(n, nt, replace=False))]
    if gpu:
        index, used_gpu = _train_add_gpu(index, xt, X, ids, progress)
        if used_gpu:
            return index, True
    try:
        index.train(xt)
    except RuntimeError as e:
        raise InvalidArgumentError(f"cannot train {factory!r} on {n} vectors ({_first_line(e)}); {FACTORY_HINT}") from None
    return index, False


def _train_add_gpu(index, xt, X, ids, progress) -> tuple[faiss.Index, bool]:
    """Train (and fill) an IVF index on the GPU, then bring it back to the CPU for saving."""
    if faiss.try_extract_index_ivf(index) is None or not gpu_available():
        return index, False
    try:
        res = faiss.StandardGpuResources()
        gidx = faiss.index_cpu_to_gpu(res, 0, index)
        gidx.train(xt)
        for i in range(0, len(X), ADD_CHUNK):
            gidx.add_with_ids(X[i : i + ADD_CHUNK], ids[i : i + ADD_CHUNK])
            if progress:
                progress(min(ADD_CHUNK, len(X) - i))
        return faiss.index_gpu_to_cpu(gidx), True
    except (RuntimeError, AttributeError):  # an index type the GPU build does not handle: CPU it is
        return index, False


# ---- search parameters ------------------------------------------------------------------------
def default_params(index: faiss.Index) -> dict:
    kind = index_kind(index)
    if kind == "ivf":
        return {"nprobe": int(faiss.extract_index_ivf(index).nprobe)}
    if kind == "hnsw":
        return {"efSearch": int(_inner(index).hnsw.efSearch)}
    return {}


def set_params(index: faiss.Index, params: dict) -> None:
    ps = faiss.ParameterSpace()
    for k, v in params.items():
        ps.set_index_parameter(index, k, float(v) if k not in ("nprobe", "efSearch") else int(v))


def search_params(index: faiss.Index, params: dict, sel=None, boost: float = 1.0):
    """SearchParameters of the right type for `index` carrying an IDSelector and the tuned values."""
    kind = index_kind(index)
    if kind == "ivf":
        nprobe = int(min(faiss.extract_index_ivf(index).nlist, params.get("nprobe", 1) * boost))
        return faiss.SearchParametersIVF(sel=sel, nprobe=max(1, nprobe))
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=sel, efSearch=int(params.get("efSearch", 16) * boost))
    return faiss.SearchParameters(sel=sel)


def exact_knn(Q: np.ndarray, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of Q against X (positions into X)."""
    return faiss.knn(np.ascontiguousarray(Q, np.float32), np.ascontiguousarray(X, np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found_i ∩ truth_i| / k over rows (ids; -1 entries ignored)."""
    hits = 0
    for f, t in zip(found[:, :k], truth[:, :k]):
        hits += len(np.intersect1d(f[f >= 0], t[t >= 0]))
    return hits / (k * len(found)) if len(found) else 1.0


def tune_params(
    index: faiss.Index, Q: np.ndarray, X: np.ndarray, ids: np.ndarray, *, target: float = TARGET_RECALL, k: int = 10,
) -> tuple[dict, float | None]:
    """Smallest nprobe / efSearch whose recall@k on queries Q, against exact search over X (ids), reaches target.

    Q should not be inside the index (held-out vectors): queries that are stored vectors find themselves
    too easily and make the recall look better than users will see it.
    """
    kind = index_kind(index)
    if kind not in ("ivf", "hnsw") or len(X) <= k:
        return default_params(index), None
    _, pos = exact_knn(Q, X, k)
    truth = ids[pos]
    if kind == "ivf":
        nlist = faiss.extract_index_ivf(index).nlist
        name, steps = "nprobe", [s for s in NPROBE_STEPS if s < nlist] + [nlist]
    else:
        name, steps = "efSearch", EF_STEPS
    rec = 0.0
    for v in steps:
        set_params(index, {name: v})
        _, found = index.search(Q, k)
        rec = recall_at_k(found, truth, k)
        if rec >= target:
            break
    return {name: int(v)}, round(float(rec), 4)


def _holdout(n: int, seed: int) -> np.ndarray:
    """Row numbers of the tuning queries: TUNE_QUERIES rows, at most a tenth of the data."""
    m = min(TUNE_QUERIES, n // 10)
    if m < 20:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(seed + 1).choice(n, m, replace=False))


# ---- files ----------------------------------------------------------------------------------
def save(index: faiss.Index, meta: dict, path: Path) -> dict:
    """Write `path` (.faiss) and its JSON sidecar (with the file's size and sha256) atomically; returns the meta."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    side = sidecar_path(path)
    stmp = side.with_name(side.name + f".tmp{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        meta = {**meta, "format": FORMAT, "n": int(index.ntotal), "faiss_bytes": tmp.stat().st_size,
                "faiss_sha256": file_sha256(tmp)}
        os.replace(tmp, path)
        stmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(stmp, side)
    finally:
        tmp.unlink(missing_ok=True)
        stmp.unlink(missing_ok=True)
    return meta


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def file_sha256(f) -> str:
    """sha256 of a file: a path, or an open binary file read from where it stands."""
    if not hasattr(f, "read"):
        with open(f, "rb") as fh:
            return file_sha256(fh)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise IndexFileError(f"no sidecar {side.name}") from None
    except (OSError, ValueError) as e:
        raise IndexFileError(f"unreadable sidecar {side.name}: {_first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"sidecar {side.name} has an unknown or older format (no checksum)")
    return meta


def load(path: Path, dim: int) -> tuple[faiss.Index, dict]:
    """Read an index and its sidecar; IndexFileError when missing, damaged (size or sha256 differ) or inconsistent.
    The file is hashed before FAISS parses it (a damaged header can make FAISS allocate wildly), through one open
    file, so another process's save in between cannot pair one file with another's sidecar."""
    path, meta = Path(path), read_meta(path)
    try:
        f = open(path, "rb")
    except OSError as e:  # missing, or not readable by this user
        raise IndexFileError(f"cannot open {path.name}: {_first_line(e)}") from None
    with f:
        if (size := os.fstat(f.fileno()).st_size) != meta.get("faiss_bytes"):
            raise IndexFileError(f"{path.name} is {size} bytes, sidecar says {meta.get('faiss_bytes')}")
        if file_sha256(f) != meta.get("faiss_sha256"):
            raise IndexFileError(f"{path.name} is damaged: its sha256 differs from the one recorded when it was saved")
        f.seek(0)
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read, 1 << 22))
        except RuntimeError as e:
            raise IndexFileError(f"unreadable {path.name}: {_first_line(e)}") from None
    if index.d != dim or index.ntotal != meta.get("n") or meta.get("dim") != dim:
        raise IndexFileError(f"{path.name} holds {index.ntotal}x{index.d}, expected {meta.get('n')}x{dim}")
    set_params(index, meta.get("params") or {})
    return index, meta


def upgrade_sidecar(path: Path, dim: int) -> bool:
    """Store format migration 1 -> 2: a format-1 sidecar (size only) gets the sha256 of its index file when the
    file has the recorded size and loads with the recorded shape; False otherwise (the next search rebuilds it)."""
    path, side = Path(path), sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
        ok = meta.get("format") == 1 and path.stat().st_size == meta.get("faiss_bytes")
        index = faiss.read_index(str(path)) if ok else None
    except (OSError, ValueError, RuntimeError, AttributeError):
        return False
    if index is None or index.d != dim or index.ntotal != meta.get("n"):
        return False
    stmp = side.with_name(side.name + f".tmp{os.getpid()}")
    stmp.write_text(json.dumps({**meta, "format": FORMAT, "faiss_sha256": file_sha256(path)}, indent=1, default=str))
    os.replace(stmp, side)
    return True


# ---- GPU ------------------------------------------------------------------------------------
def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def require_gpu() -> None:
    if not gpu_available():
        raise NotSupportedError(
            "a GPU index was asked for but FAISS sees no GPU (faiss-cpu, or no CUDA device); "
            "install faiss-gpu-cu12 (pip install 'embedstore[gpu]') on a CUDA machine, or drop --gpu"
        )


def to_gpu(index: faiss.Index, params: dict) -> faiss.Index | None:
    """A GPU copy of a flat or IVF index for searching (None for kinds FAISS-GPU lacks, e.g. HNSW)."""
    if not gpu_available() or index_kind(index) not in ("flat", "ivf"):
        return None
    try:
        res = faiss.StandardGpuResources()
        gidx = faiss.index_cpu_to_gpu(res, 0, index)
        gidx.referenced_objects = [res]  # keep the resources alive as long as the index
        if "nprobe" in params:
            faiss.GpuParameterSpace().set_index_parameter(gidx, "nprobe", int(params["nprobe"]))
        return gidx
    except (RuntimeError, AttributeError):
        return None


# ---- synthetic data (tests, benchmarks) ----------------------------------------------------------
def clustered_vectors(
    n: int, dim: int, *, clusters: int | None = None, spread: float = 0.6, seed: int = 0, chunk: int = 100_000
) -> np.ndarray:
    """Seeded L2-normalised vectors around `clusters` random centres (a stand-in for image embeddings);
    `spread` is the noise norm relative to the unit centre; draw queries with a different seed."""
    rng = np.random.default_rng(seed)
    centres_rng = np.random.default_rng(12345)  # same centres for every seed: queries match the base
    clusters = clusters or max(8, int(math.sqrt(n)))
    C = centres_rng.standard_normal((clusters, dim)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = C[rng.integers(0, clusters, m)]
        x += rng.standard_normal((m, dim), dtype=np.float32) * (spread / math.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[i : i + m] = x
    return out


def _first_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= 200 else s[:197] + "..."
