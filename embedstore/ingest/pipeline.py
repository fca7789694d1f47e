"""The batch embedding pipeline.

DataLoader worker processes read, decode (Pillow draft mode for large JPEGs, EXIF orientation) and
preprocess; the main process runs the frozen model under inference_mode and yields L2-normalised
float32 batches. On CUDA: bf16/fp16 autocast, channels_last, pinned memory + non_blocking copies,
automatic batch size, optional GPU JPEG decode. On CPU (unless worker processes are asked for): one
thread per core, each decoding and embedding whole batches on one intra-op thread, channels_last, small
batches (channels_last with small batches was about 4x faster than NCHW at batch 64 for efficientnet_lite0
on 2 cores; see _embed_cpu_streams for why threads instead of workers).
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from embedstore.errors import InvalidArgumentError, error_text
from embedstore.ingest.backbones.base import Backbone, PreprocessCfg
from embedstore.ingest.images import check_pixel_limit
from embedstore.ingest.sources import read_bytes
from embedstore.ingest.images import load_image, list_image_files, IMAGE_EXTENSIONS  # noqa: F401

CPU_BATCH = 4  # fastest for efficientnet_lite0 at 1 thread per stream: larger batches allocate
# activation buffers above glibc's mmap threshold, and every forward pays page faults for them (measured)


def resolve_device(device: str | None = "auto") -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidArgumentError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


@functools.lru_cache(maxsize=16)
def _geometry(pre: PreprocessCfg) -> Callable:
    """The resize + centre-crop part of the model's eval transform (everything before ToTensor)."""
    from torchvision.transforms import Compose

    return Compose(pre.build_transform().transforms[:-2])


def preprocess_uint8(im: Image.Image, pre: PreprocessCfg) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8: `pre.build_transform()` up to its ToTensor (Resize + CenterCrop).

    Normalisation happens per batch (`normalize_batch`): one vectorised pass instead of ToTensor's
    per-image transpose + divide and Normalize's per-image mean/std tensors, on uint8 data that is 4x
    smaller to move between processes, laid out channels_last as the model wants it.
    (Pillow's resize(box=...) would resample only the crop, but its output differs from resize-then-crop
    by up to 19/255 on some sizes, so the reference geometry is kept.)
    """
    return np.array(_geometry(pre)(im))  # a writable copy: torch.from_numpy shares it


def normalize_batch(u8: torch.Tensor, pre: PreprocessCfg) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised, channels_last memory (no copy to reorder)."""
    x = u8.permute(0, 3, 1, 2).float()  # keeps the NHWC strides: channels_last
    mean = torch.tensor([255.0 * m for m in pre.mean], device=x.device).view(1, 3, 1, 1)
    inv_std = torch.tensor([1.0 / (255.0 * s) for s in pre.std], device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).mul_(inv_std)


class ImageDataset(torch.utils.data.Dataset):
    """(id, path) items -> (id, (H,W,3) uint8 tensor, None) or (id, None, error message)."""

    def __init__(self, items: Sequence[tuple[int, str]], pre: PreprocessCfg):
        self.items = list(items)
        self.pre = pre

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        id_, path = self.items[i]
        try:
            return id_, torch.from_numpy(preprocess_uint8(load_image(path, self.pre), self.pre)), None
        except Exception as e:  # recorded in the errors table; the run goes on
            return id_, None, error_text(e)


def _collate(batch):
    """-> ids (B,), uint8 (B, H, W, 3) or None, [(id, error)]."""
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, err) for i, t, err in batch if t is None]
    ids = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    x = torch.stack([t for _, t in ok]) if ok else None
    return ids, x, bad


def _mp_context():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "PIL.Image", "torchvision.transforms", "embedstore.ingest.pipeline"])
    return ctx


def _worker_init(_):
    torch.set_num_threads(1)


@dataclass
class EmbedStats:
    embedded: int = 0
    failed: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    device: str = "cpu"

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def autotune_cuda_batch(backbone: Backbone, device: str, start: int = 1024, amp_dtype=None) -> int:
    """Largest power-of-two batch (<= start) whose forward pass fits in GPU memory."""
    c, h, w = backbone.preprocess.input_size
    bs = start
    while bs >= 1:
        try:
            x = torch.zeros(bs, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16):
                backbone.forward(x)
            torch.cuda.synchronize()
            del x
            torch.cuda.empty_cache()
            return bs
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            bs //= 2
    return 1


def default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    if device == "cpu":
        # decode is cheap next to the forward pass on CPU; one worker keeps it off the model's threads
        return 1 if n <= 4 else min(4, n // 4)
    return min(16, n)


def embed_items(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    *,
    device: str = "cpu",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    stats: EmbedStats | None = None,
    gpu_decode: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield (ids, vectors (B,D) float32 L2-normalised, [(id, error)]) per batch, in input order.

    gpu_decode: workers only read file bytes (and check headers); JPEGs are decoded on `device` with
    nvJPEG in one call per batch (torchvision.io.decode_jpeg), other formats with Pillow.
    """
    stats = stats if stats is not None else EmbedStats()
    cuda = device.startswith("cuda")
    amp_dtype = None
    if cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        backbone.image_model.to(memory_format=torch.channels_last)
        batch_size = batch_size or autotune_cuda_batch(backbone, device, amp_dtype=amp_dtype)
    else:
        backbone.image_model.to(memory_format=torch.channels_last)
        batch_size = batch_size or CPU_BATCH
    stats.batch_size, stats.device = batch_size, device
    if not items:
        return
    if not cuda and not workers and not gpu_decode:
        yield from _embed_cpu_streams(backbone, items, batch_size, progress, stats)
        return
    if workers is None:
        # starting worker processes costs seconds; small batches of work decode in-process
        workers = default_workers(device) if len(items) > 4 * batch_size else 0
    loader = torch.utils.data.DataLoader(
        RawDataset(items) if gpu_decode else ImageDataset(items, backbone.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate_raw if gpu_decode else _collate,
        pin_memory=cuda and not gpu_decode,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # LanceDB's async runtime is not fork-safe: workers start from a clean forkserver process
        multiprocessing_context=_mp_context() if workers else None,
    )
    t0 = time.perf_counter()
    for batch in loader:
        if gpu_decode:
            ids, x, bad = _decode_on_device(batch, backbone.preprocess, device)
        else:
            ids, x, bad = batch
            if x is not None:
                x = normalize_batch(x.to(device, non_blocking=cuda), backbone.preprocess)
        vecs = np.zeros((0, backbone.dim), np.float32)
        if x is not None:
            if cuda:
                with torch.autocast("cuda", dtype=amp_dtype):
                    vecs = backbone.forward(x).cpu().numpy()
            else:
                vecs = backbone.forward(x).numpy()
        stats.embedded += len(ids)
        stats.failed += len(bad)
        stats.seconds = time.perf_counter() - t0
        if progress:
            progress(len(ids) + len(bad))
        yield ids.numpy(), vecs.astype(np.float32, copy=False), bad


def cpu_streams() -> int:
    """Parallel decode+forward streams on CPU: one per core torch may use (its thread setting), at most 16."""
    return max(1, min(16, torch.get_num_threads()))


def _embed_cpu_streams(backbone: Backbone, items, batch_size: int, progress, stats: EmbedStats):
    """CPU pipeline: S threads, each decoding and embedding whole batches with one intra-op thread.

    On 2 shared cores this ran about 2x faster than one forward pass on 2 OpenMP threads fed by a worker
    process (benchmarks/embed_throughput.py): independent streams have no OpenMP barriers to wait at when
    another process takes a core, decode overlaps the other streams' forward passes, and no worker process
    has to start. Pillow's decode/resize and torch's kernels release the GIL. Batches come back in order.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    ds = ImageDataset(items, backbone.preprocess)
    chunks = iter(range(0, len(ds), batch_size))
    streams = min(cpu_streams(), -(-len(ds) // batch_size))

    def work(start: int):
        ids, x, bad = _collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        vecs = np.zeros((0, backbone.dim), np.float32)
        if x is not None:
            vecs = backbone.forward(normalize_batch(x, backbone.preprocess)).numpy()
        return ids.numpy(), vecs.astype(np.float32, copy=False), bad

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: restored when the generator ends
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="embedstore-embed") as ex:
            window = deque(ex.submit(work, c) for c in itertools.islice(chunks, 2 * streams))
            while window:
                ids, vecs, bad = window.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    window.append(ex.submit(work, nxt))
                stats.embedded += len(ids)
                stats.failed += len(bad)
                stats.seconds = time.perf_counter() - t0
                if progress:
                    progress(len(ids) + len(bad))
                yield ids, vecs, bad
    finally:
        torch.set_num_threads(threads)


JPEG_MAGIC = b"\xff\xd8\xff"


class RawDataset(torch.utils.data.Dataset):
    """(id, path) -> (id, file bytes, None) or (id, None, error) for the GPU-decode path.

    Only the header is parsed here (format and size: non-images and decompression bombs fail early)."""

    def __init__(self, items: Sequence[tuple[int, str]]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        id_, path = self.items[i]
        try:
            data = read_bytes(path)
            check_pixel_limit(Image.open(io.BytesIO(data)))
            return id_, data, None
        except Exception as e:
            return id_, None, error_text(e)


def _collate_raw(batch):
    return batch


def _decode_on_device(batch, pre: PreprocessCfg, device: str):
    """[(id, bytes|None, err)] -> ids, (B,3,H,W) normalised on `device` or None, [(id, error)].

    JPEGs go through nvJPEG in one call; other formats, and JPEGs it refuses, through Pillow."""
    bad = [(i, err) for i, d, err in batch if d is None]
    jpegs = [(i, d) for i, d, _ in batch if d is not None and d[:3] == JPEG_MAGIC]
    others = [(i, d) for i, d, _ in batch if d is not None and d[:3] != JPEG_MAGIC]
    ids: list[int] = []
    parts: list[torch.Tensor] = []
    if jpegs:
        try:
            parts.append(gpu_decode_batch([d for _, d in jpegs], pre, device))
            ids += [i for i, _ in jpegs]
        except Exception:  # one bad JPEG fails the batched call: fall back to Pillow for this batch
            others = jpegs + others
    for i, d in others:
        try:
            u8 = torch.from_numpy(preprocess_uint8(load_image(d, pre), pre)).unsqueeze(0)
            parts.append(normalize_batch(u8.to(device), pre))
            ids.append(i)
        except Exception as e:
            bad.append((i, error_text(e)))
    x = torch.cat(parts).contiguous(memory_format=torch.channels_last) if parts else None
    return torch.tensor(ids, dtype=torch.int64), x, bad


def gpu_decode_batch(datas: Sequence[bytes], pre: PreprocessCfg, device: str) -> torch.Tensor:
    """Decode JPEG bytes with nvJPEG (torchvision.io.decode_jpeg on `device`), resize, crop, normalise.

    Works on CPU too (device='cpu'), which is how it is tested without a GPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    imgs = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    size = pre.input_size[-1]
    mean = torch.tensor(pre.mean, device=device).view(3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(3, 1, 1)
    interp = {"bilinear": F.InterpolationMode.BILINEAR, "nearest": F.InterpolationMode.NEAREST}.get(
        pre.interpolation, F.InterpolationMode.BICUBIC)
    out = []
    for im in imgs:
        im = F.resize(im, pre.resize_size, interpolation=interp, antialias=True)
        im = F.center_crop(im, [size, size])
        out.append((im.float() / 255.0 - mean) / std)
    return torch.stack(out)
