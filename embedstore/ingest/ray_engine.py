"""The Ray engine: the same ingest on a Ray cluster (or a local Ray), through Ray Data.

    hash    Ray tasks read and hash every listed file (local paths or s3://...) -> (path, hash, size | error)
    ---     the driver dedups by content hash and records new images exactly as on one machine
    embed   Ray tasks read, decode and preprocess (Pillow, draft mode) -> uint8 pixels   (CPU tasks)
            an actor pool runs the frozen model: one model per GPU, or per CPU worker  (ray actors)
            (CPU workers decode their own batches: no pixels cross processes, as in the local engine)
            the driver commits vectors to the store's LanceDB table every RAY_COMMIT_EVERY images

Workers need no access to the store: the model travels through Ray's object store and the vectors come
back to the driver, which alone writes (one writer, the store's write lock held). So a store on this
machine can be filled by a remote cluster, and a kill of the driver loses at most one uncommitted chunk:
the next run embeds exactly what is missing (resume), as the single-machine engine does. A worker or actor
that dies mid-run is retried by Ray (tasks) or restarted (actors), with Ray Data's defaults (no limit); its
batch is embedded again, and the driver never commits an id twice.

Workers need embedstore's dependencies (torch, timm/open_clip, Pillow, pyarrow): a cluster's ML image has them.
On a cluster (`address` given) the engine ships the driver's embedstore package to the workers (Ray's
py_modules), and it always passes on the driver's AWS_* settings for s3:// sources.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from embedstore.errors import InvalidArgumentError, error_text
from embedstore.ingest.sources import aws_env

if TYPE_CHECKING:
    from embedstore.ingest.backbones.base import Backbone

RAY_COMMIT_EVERY = 4096  # images per vector commit on the Ray engine (a LanceDB commit costs ~10-50 ms)
HASH_BATCH = 64
DEFAULT_BATCH = 32  # images per embedding call on CPU workers; GPUs use `batch_size` or 256


# ---- the work done on the workers (module-level: Ray pickles them by reference) -------------------
def hash_batch(batch: dict) -> dict:
    from embedstore.ingest.sources import hash_and_size

    hashes, sizes, errors = [], [], []
    for path in batch["path"]:
        try:
            h, n = hash_and_size(str(path))
            hashes.append(h), sizes.append(n), errors.append("")
        except OSError as e:
            hashes.append(""), sizes.append(-1), errors.append(error_text(e))
    return {"path": batch["path"], "hash": np.array(hashes, object), "size": np.array(sizes, np.int64),
            "error": np.array(errors, object)}


def decode_batch(batch: dict, pre: dict) -> dict:
    """(id, path) rows -> id, (B, H, W, 3) uint8 pixels (zeros where unreadable), error ("" when fine)."""
    from embedstore.ingest.backbones.base import PreprocessCfg
    from embedstore.ingest.images import load_image
    from embedstore.ingest.pipeline import preprocess_uint8

    cfg = PreprocessCfg.from_dict(pre)
    c, h, w = cfg.input_size
    ids = np.asarray(batch["id"], np.int64)
    pixels = np.zeros((len(ids), h, w, 3), np.uint8)
    errors = []
    for j, path in enumerate(batch["path"]):
        try:
            pixels[j] = preprocess_uint8(load_image(str(path), cfg), cfg)
            errors.append("")
        except Exception as e:  # recorded in the store's errors table; the run goes on
            errors.append(error_text(e))
    return {"id": ids, "pixels": pixels, "error": np.array(errors, object)}


class Embedder:
    """One frozen model per actor (on the actor's GPU when it has one); uint8 pixels -> L2-normalised vectors."""

    def __init__(self, model_ref, threads: int, pre: dict | None):
        import ray
        import torch

        bb = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, threads))
        bb.image_model.to(memory_format=torch.channels_last)
        self.bb = bb.to(self.device)
        self.pre = pre  # set: batches arrive as (id, path) and are decoded here first
        self.amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self.device == "cuda" else None

    def __call__(self, batch: dict) -> dict:
        import torch

        from embedstore.ingest.pipeline import CPU_BATCH, normalize_batch

        if self.pre is not None:
            batch = decode_batch(batch, self.pre)
        ok = np.flatnonzero(np.asarray([e == "" for e in batch["error"]], bool))
        vecs = np.zeros((len(batch["id"]), self.bb.dim), np.float32)
        if len(ok):
            u8 = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device, non_blocking=True)
            x = normalize_batch(u8, self.bb.preprocess)
            if self.amp is not None:
                with torch.autocast("cuda", dtype=self.amp):
                    vecs[ok] = self.bb.forward(x).float().cpu().numpy()
            else:  # small forward batches on CPU, as the local engine does (CPU_BATCH: measured ~4x faster than 64)
                vecs[ok] = np.concatenate([self.bb.forward(x[i : i + CPU_BATCH]).numpy() for i in range(0, len(x), CPU_BATCH)])
        return {"id": batch["id"], "vector": vecs, "error": batch["error"]}


def quiet_ray_warnings(batches: Iterator) -> Iterator:
    """Ray Data's advice on tuning ("won't fully utilize the available concurrency") is not for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data")
        yield from batches


# ---- the driver side ------------------------------------------------------------------------------
@dataclasses.dataclass
class RayEngine:
    """How to run on Ray: the cluster (`address`: None starts or reuses a local Ray, "auto" joins the
    running cluster, "ray://host:10001" a remote one), the actor pool size and the GPUs per actor."""

    address: str | None = None
    workers: int | None = None  # embedding actors; default: one per GPU, else one per CPU
    gpus_per_worker: float = 0.0
    batch_size: int | None = None
    commit_every: int = RAY_COMMIT_EVERY
    decode_tasks: bool | None = None  # decode in separate CPU tasks; default: with GPU workers (CPU workers decode)
    name: str = "ray"

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise InvalidArgumentError(f"--workers {self.workers} is not a worker count; pass 1 or more")
        if self.gpus_per_worker < 0:
            raise InvalidArgumentError(f"--num-gpus-per-worker {self.gpus_per_worker} is negative; pass 0, 0.5, 1...")

    # -- cluster --
    def start(self):
        # Ray Data's INFO lines ("execution finished") stay in Ray's log files (/tmp/ray/session_latest/logs)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise InvalidArgumentError("--engine ray needs Ray: pip install 'embedstore[ray]' (or 'ray[data]')") from None
        if not ray.is_initialized():
            try:
                with warnings.catch_warnings():  # "lancedb fork support is experimental": Ray forks its daemons
                    warnings.filterwarnings("ignore", message="lancedb fork", category=RuntimeWarning)
                    ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False,
                             logging_level=logging.WARNING, runtime_env=self.runtime_env() or None)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InvalidArgumentError(
                    f"cannot reach the Ray cluster at {self.address!r} ({error_text(e)}); start one with `ray start "
                    "--head`, or leave --address out to run a local Ray on this machine") from None
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows its own bar
        ctx.print_on_execution_start = False
        return ray

    def runtime_env(self) -> dict:
        """What the workers get: the driver's AWS_* settings, and, on a cluster (an address given), this very
        embedstore package (Ray's py_modules), so the workers run the driver's version of the code."""
        env: dict = {"env_vars": aws_env()} if aws_env() else {}
        if self.address:
            import embedstore

            env["py_modules"] = [os.path.dirname(embedstore.__file__)]
        return env

    def pool_size(self) -> int:
        ray = self.start()
        res = ray.cluster_resources()
        gpus = res.get("GPU", 0)
        if self.gpus_per_worker > 0 and gpus < self.gpus_per_worker * (self.workers or 1):
            raise InvalidArgumentError(
                f"the Ray cluster has {gpus:g} GPUs, too few for {self.workers or 1} worker(s) with "
                f"{self.gpus_per_worker:g} each; lower --num-gpus-per-worker/--workers, or leave --num-gpus-per-worker "
                "out to embed on CPU workers")
        if self.workers:
            return self.workers
        if self.gpus_per_worker > 0:
            return max(1, int(gpus // self.gpus_per_worker))
        return max(1, int(res.get("CPU", 1)))

    def describe(self) -> str:
        ray = self.start()
        res = ray.cluster_resources()
        gpu = f", {self.gpus_per_worker:g} GPU each" if self.gpus_per_worker else ""
        return (f"ray ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs in the cluster; "
                f"{self.pool_size()} embedding workers{gpu})")

    # -- stage 1: hashing --
    def hash_files(self, files: Sequence[str], progress: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[str, str | None, int | None, str | None]]:
        """(path, hash, size, None) or (path, None, None, error) for every file, in any order."""
        ray = self.start()
        if not files:
            return
        ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=self._blocks(len(files), HASH_BATCH))
        ds = ds.map_batches(hash_batch, batch_size=HASH_BATCH, batch_format="numpy")
        for b in quiet_ray_warnings(ds.iter_batches(batch_size=None, batch_format="numpy")):
            for p, h, n, e in zip(b["path"], b["hash"], b["size"], b["error"]):
                yield (str(p), None, None, str(e)) if e else (str(p), str(h), int(n), None)
            if progress:
                progress(len(b["path"]))

    # -- stage 2: embedding --
    def embed(self, backbone: "Backbone", items: Sequence[tuple[int, str]], progress: Callable[[int], None] | None = None,
              stats=None) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Yield (ids, vectors, [(id, error)]) per batch, in any order; each id exactly once."""
        import time

        ray = self.start()
        if not items:
            return
        pool = self.pool_size()
        bs = self.batch_size or (256 if self.gpus_per_worker else DEFAULT_BATCH)
        light = dataclasses.replace(backbone, text_encoder=None, extra={}, device="cpu")
        light.image_model = light.image_model.to("cpu")
        ref = ray.put(light)
        ds = ray.data.from_items([{"id": int(i), "path": p} for i, p in items],
                                 override_num_blocks=self._blocks(len(items), bs))
        pre = backbone.preprocess.to_dict()
        split = self.decode_tasks if self.decode_tasks is not None else bool(self.gpus_per_worker)
        if split:  # decode in CPU tasks, embed in (GPU) actors: the stages overlap
            ds = ds.map_batches(decode_batch, batch_size=bs, batch_format="numpy", fn_kwargs={"pre": pre}, num_cpus=1)
            args = (ref, 1, None)
        else:  # CPU workers decode their own batches (no pixels between processes), as the local engine's streams do
            args = (ref, 1, pre)
        ds = ds.map_batches(Embedder, batch_size=bs, batch_format="numpy", fn_constructor_args=args,
                            compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=0 if self.gpus_per_worker else 1,
                            num_gpus=self.gpus_per_worker or None)
        seen: set[int] = set()
        t0 = time.perf_counter()
        for b in quiet_ray_warnings(ds.iter_batches(batch_size=None, batch_format="numpy")):
            ids = np.asarray(b["id"], np.int64)
            fresh = np.asarray([int(i) not in seen for i in ids], bool)  # a retried batch may come twice
            seen.update(int(i) for i in ids)
            err = np.asarray([bool(e) for e in b["error"]], bool)
            ok = fresh & ~err
            bad = [(int(i), str(e)) for i, e, f, x in zip(ids, b["error"], fresh, err) if f and x]
            if stats is not None:
                stats.embedded += int(ok.sum())
                stats.failed += len(bad)
                stats.seconds = time.perf_counter() - t0
            if progress:
                progress(int(fresh.sum()))
            yield ids[ok], np.asarray(b["vector"], np.float32)[ok], bad
        if stats is not None:
            stats.batch_size, stats.device = bs, self.describe()

    def _blocks(self, n: int, batch: int) -> int:
        """Blocks of 1-4 batches: every worker gets some (several when there is enough work), and a block's
        decoded pixels stay small."""
        return max(1, min(-(-n // batch), 2 * self.pool_size()), -(-n // (4 * batch)))


ENGINES = ("local", "ray")


def make_engine(engine: str | None, *, address: str | None = None, workers: int | None = None,
                gpus_per_worker: float = 0.0, batch_size: int | None = None) -> RayEngine | None:
    """None for the single-machine engine ("local"), a RayEngine for "ray"; anything else is refused."""
    if engine in (None, "local"):
        if address or gpus_per_worker:
            raise InvalidArgumentError("--address and --num-gpus-per-worker are for --engine ray; add --engine ray")
        return None
    if engine != "ray":
        raise InvalidArgumentError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
    return RayEngine(address=address, workers=workers, gpus_per_worker=gpus_per_worker, batch_size=batch_size)
