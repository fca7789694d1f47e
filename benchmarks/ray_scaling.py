"""Ray engine scaling: `store.add(..., engine="ray")` with 1 and 2 embedding workers on a local Ray, and the
single-machine engine on the same images, in one run.

Each repeat adds the same N JPEG photo views (256x256, generated offline) into fresh stores: local engine,
Ray with 1 worker, Ray with 2 workers (order rotated per repeat, so machine load drifts evenly). Timed
from call to return (hashing job, embedding job, LanceDB commits, compaction); the Ray runs include
starting the actor pool (model shipped through the object store), which is a fixed cost per add.
Reported: images/s per configuration (mean and spread over repeats), and the 2-worker / 1-worker ratio
measured within each repeat. Prints a table and one JSON line.

    python benchmarks/ray_scaling.py                  # 400 images, 3 repeats, local Ray with 2 CPUs
    python benchmarks/ray_scaling.py --n 2000 --cpus 16 --workers 1 2 4 8
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

import embedstore
from embedstore.samples import make_photo_views


def run(folder: Path, root: Path, engine: str, workers: int | None) -> dict:
    s = embedstore.open(root)
    t0 = time.perf_counter()
    res = s.add([folder], engine=engine, workers=workers, progress=False)
    sec = time.perf_counter() - t0
    assert res.added == sum(1 for _ in folder.rglob("*.jpg")), res
    return {"seconds": sec, "images_per_second": res.added / sec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="images (a multiple of 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="es-ray-"))
    make_photo_views(tmp / "imgs", per_class=args.n // 8, seed=0)
    configs = [("local", None)] + [("ray", w) for w in args.workers]
    results: dict[str, list[float]] = {f"{e}{'' if w is None else f'-{w}'}": [] for e, w in configs}
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for e, w in order:
            key = f"{e}{'' if w is None else f'-{w}'}"
            out = run(tmp / "imgs", tmp / f"s-{r}-{key}.es", e, w)
            results[key].append(out["images_per_second"])
            print(f"repeat {r}: {key:8s} {out['images_per_second']:7.1f} img/s ({out['seconds']:.1f} s)", file=sys.stderr)
    ray.shutdown()
    base = f"ray-{args.workers[0]}"
    ratios = {f"ray-{w}": [b / a for a, b in zip(results[base], results[f"ray-{w}"])] for w in args.workers[1:]}
    print(f"\n{'config':10s} {'img/s mean':>11s} {'min':>7s} {'max':>7s}")
    for k, v in results.items():
        print(f"{k:10s} {statistics.mean(v):11.1f} {min(v):7.1f} {max(v):7.1f}")
    for k, v in ratios.items():
        print(f"{k} / {base}: {statistics.mean(v):.2f} (per repeat: {', '.join(f'{x:.2f}' for x in v)})")
    print(json.dumps({
        "benchmark": "ray_scaling", "n": args.n, "repeats": args.repeats, "ray_cpus": args.cpus,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "backbone": "offline:efficientnet_lite0",
        "images_per_second": {k: [round(x, 2) for x in v] for k, v in results.items()},
        "ratio_vs_" + base: {k: [round(x, 3) for x in v] for k, v in ratios.items()},
    }))


if __name__ == "__main__":
    main()
