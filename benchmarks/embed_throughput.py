"""Embedding throughput: end-to-end `store.add` images/s against the model's forward-only ceiling.

In one run, on the same images (N JPEG photo views of 640x480, written to a temp dir):

  ceiling      the backbone's forward pass alone on pre-decoded, pre-processed tensors, best over
               batch size x memory format (contiguous / channels_last) x threading, with torch's
               default thread count: "intra" (one batch on all threads, OpenMP) or, on CPU, "streams"
               (one batch per thread, one intra-op thread each: what the CPU pipeline does);
  end-to-end   `store.add(folder)` into a fresh store: listing, hashing, decode + preprocessing,
               forward, LanceDB commits and compaction, timed from call to return (model already loaded);
  ratio        end-to-end / ceiling. Target on CPU for efficientnet_lite0: >= 0.75.

The ceiling sweep runs once; then each repeat times one `add` and, right after it, the best ceiling
configuration again on as many images, so each ratio compares two measurements taken under about the
same machine load (on a shared machine, look at the per-run ratios and the load average).
Prints a table and one JSON line.

    python benchmarks/embed_throughput.py                      # offline:efficientnet_lite0, 600 images, CPU
    python benchmarks/embed_throughput.py --n 300 --repeats 3 --batch-size 16 --workers 0
    python benchmarks/embed_throughput.py --backbone openclip:ViT-B-16/random --device cuda --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import embedstore
from embedstore.ingest.backbones import load_backbone
from embedstore.ingest.pipeline import load_image, resolve_device
from embedstore.samples import PHOTOS, photo


def make_images(out: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """n distinct 640x480 JPEG views (crop, flip, colour jitter) of scikit-image's bundled photos."""
    rng = np.random.default_rng(seed)
    srcs = [photo(p) for p in PHOTOS]
    out.mkdir(parents=True, exist_ok=True)
    aspect = size[0] / size[1]
    paths = []
    for i in range(n):
        im = srcs[i % len(srcs)]
        w, h = im.size
        cw = int(min(w, h * aspect) * rng.uniform(0.6, 1.0))
        ch = int(cw / aspect)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        v = im.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            v = ImageOps.mirror(v)
        arr = np.asarray(v, dtype=np.float32) * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
        p = out / f"view_{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def predecode(bb, paths, limit: int = 64) -> torch.Tensor:
    """The model inputs for the first `limit` images, decoded and preprocessed exactly as the pipeline does."""
    tf = bb.transform()
    return torch.stack([tf(load_image(p, bb.preprocess)) for p in paths[:limit]])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_rate(bb, pool: torch.Tensor, device: str, bs: int, fmt: str, images: int, mode: str = "intra") -> float:
    """Images/s of the forward pass alone at batch size `bs` and memory format `fmt`.

    mode "intra": one batch at a time on torch's threads (OpenMP intra-op parallelism);
    mode "streams": as many batches at once as torch has threads, each on one intra-op thread (CPU only).
    """
    from concurrent.futures import ThreadPoolExecutor

    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    bb.image_model.to(memory_format=mf)
    reps = -(-bs // len(pool))
    x = torch.cat([pool] * reps)[:bs].to(device).contiguous(memory_format=mf)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    threads = torch.get_num_threads()
    streams = threads if mode == "streams" else 1
    steps = max(2 * streams, -(-images // bs))
    try:
        if mode == "streams":
            torch.set_num_threads(1)
        with amp, ThreadPoolExecutor(streams) as ex:
            list(ex.map(lambda _: bb.forward(x), range(streams)))  # warm-up (allocations, kernel choice)
            _sync(device)
            t0 = time.perf_counter()
            list(ex.map(lambda _: bb.forward(x), range(steps)))
            _sync(device)
    finally:
        torch.set_num_threads(threads)
    return steps * bs / (time.perf_counter() - t0)


def sweep(bb, pool, device, batch_sizes, formats, modes, images) -> list[dict]:
    rows = []
    for mode in modes:
        for fmt in formats:
            for bs in batch_sizes:
                rate = forward_rate(bb, pool, device, bs, fmt, images, mode)
                rows.append({"mode": mode, "format": fmt, "batch_size": bs, "images_per_second": rate})
    return rows


def end_to_end(folder: Path, n: int, args, workdir: Path, k: int) -> dict:
    root = workdir / f"store_{k}.es"
    store = embedstore.open(root, backbone=args.backbone, weights=args.weights, device=args.device)
    t0 = time.perf_counter()
    res = store.add([folder], batch_size=args.batch_size, workers=args.workers, progress=False)
    seconds = time.perf_counter() - t0
    assert res.added == n and res.errors == 0, res.to_dict()
    return {
        "images_per_second": n / seconds,
        "seconds": seconds,
        "embed_images_per_second": res.images_per_second,
        "batch_size": res.batch_size,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="offline:efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="local checkpoint for the backbone")
    ap.add_argument("--n", type=int, default=600, help="number of 640x480 JPEGs")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--repeats", type=int, default=2, help="end-to-end runs, each paired with a ceiling run")
    ap.add_argument("--batch-size", type=int, default=None, help="for add (default: the pipeline's automatic choice)")
    ap.add_argument("--workers", type=int, default=None, help="for add (default: the pipeline's automatic choice)")
    ap.add_argument("--sweep-images", type=int, default=None, help="images per sweep cell (default: 64 CPU, 2048 GPU)")
    ap.add_argument("--ceiling-seconds", type=float, default=None, help="length of each paired ceiling run "
                    "(default: as many images as the end-to-end run)")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    cuda = args.device.startswith("cuda")
    batch_sizes = [32, 64, 128, 256, 512] if cuda else [1, 4, 8, 16, 32, 64]
    formats = ["contiguous", "channels_last"]
    # the ceiling is the best way to run the model alone: one batch on all threads, or (CPU) one per thread
    modes = ["intra"] if cuda or torch.get_num_threads() == 1 else ["intra", "streams"]
    sweep_images = args.sweep_images or (2048 if cuda else 64)

    with tempfile.TemporaryDirectory(prefix="embed_throughput_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        paths = make_images(tmp / "images", args.n)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"wrote {args.n} JPEGs 640x480 ({mb:.1f} MB) in {time.perf_counter() - t:.1f}s", file=sys.stderr)

        bb = load_backbone(args.backbone, args.weights, device=args.device)
        pool = predecode(bb, paths)
        grid = sweep(bb, pool, args.device, batch_sizes, formats, modes, sweep_images)
        best = max(grid, key=lambda r: r["images_per_second"])

        runs = []
        for k in range(args.repeats):
            e2e = end_to_end(tmp / "images", args.n, args, tmp, k)
            # as many images as the add embedded (about as long, so both see the same machine load)
            images = args.n if not args.ceiling_seconds else int(best["images_per_second"] * args.ceiling_seconds)
            images = max(best["batch_size"] * 2, images)
            ceil = forward_rate(bb, pool, args.device, best["batch_size"], best["format"], images, best["mode"])
            runs.append({**e2e, "ceiling": ceil, "ratio": e2e["images_per_second"] / ceil})

    ratio = statistics.median(r["ratio"] for r in runs)
    result = {
        "benchmark": "embed_throughput",
        "backbone": args.backbone,
        "device": args.device,
        "n": args.n,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "ceiling_best": {"mode": best["mode"], "batch_size": best["batch_size"], "format": best["format"]},
        "ceiling_sweep": [{**r, "images_per_second": round(r["images_per_second"], 2)} for r in grid],
        "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
        "end_to_end_images_per_second": round(statistics.median(r["images_per_second"] for r in runs), 2),
        "ceiling_images_per_second": round(statistics.median(r["ceiling"] for r in runs), 2),
        "ratio": round(ratio, 3),
        "target_ratio": 0.75 if not cuda else None,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    print(f"\n{r['backbone']} on {r['device']} ({r['torch_threads']} torch threads, {r['cpu_count']} CPUs, "
          f"load {r['load_avg_1m']:.1f}), {r['n']} JPEGs 640x480")
    print("\nforward-only ceiling (pre-decoded tensors), images/s")
    cols = sorted({(x["mode"], x["format"]) for x in r["ceiling_sweep"]})
    sizes = sorted({x["batch_size"] for x in r["ceiling_sweep"]})
    print(f"{'batch':>8} " + " ".join(f"{m + '/' + f:>22}" for m, f in cols))
    cell = {(x["mode"], x["format"], x["batch_size"]): x["images_per_second"] for x in r["ceiling_sweep"]}
    for bs in sizes:
        print(f"{bs:>8} " + " ".join(f"{cell[(m, f, bs)]:>22.1f}" for m, f in cols))
    b = r["ceiling_best"]
    print(f"best: {b['mode']}, {b['format']}, batch {b['batch_size']}  (intra = one batch on all torch threads; "
          "streams = one batch per thread, 1 intra-op thread each)")
    print(f"\n{'run':>4} {'add img/s':>10} {'add s':>8} {'embed img/s':>12} {'ceiling img/s':>14} {'ratio':>6}")
    for i, x in enumerate(r["runs"]):
        print(f"{i:>4} {x['images_per_second']:>10.1f} {x['seconds']:>8.1f} {x['embed_images_per_second']:>12.1f} "
              f"{x['ceiling']:>14.1f} {x['ratio']:>6.2f}")
    target = f" (target >= {r['target_ratio']})" if r["target_ratio"] else ""
    print(f"\nmedian ratio end-to-end / ceiling: {r['ratio']:.2f}{target}\n")


if __name__ == "__main__":
    main()
