"""Few-shot benchmark: accuracy of every head per shots level on real features, next to scikit-learn.

Features: the packaged offline:efficientnet_lite0 backbone on two real image sets made offline by
embedstore.samples — scikit-learn digits (100 per class, 10 classes) and scikit-image photo views
(40 per photo, 8 classes). For each shots level (1, 2, 4, 8, 16) and each of >= 10 seeded episodes, a
support set of `shots` images per class is drawn; every other image is the query set and, for the
transductive heads, the unlabeled collection (as in a store: the unlabeled images are there).
References on the very same vectors: LogisticRegression(), KNeighborsClassifier(min(5, n)),
NearestCentroid(). Target: auto >= best reference + 0.02, accuracy averaged over the shots levels.
Embeddings are cached in benchmarks/out/. Prints a table, then one JSON line.

    python benchmarks/fewshot.py                      # ~10 min on 2 busy cores
    python benchmarks/fewshot.py --episodes 3 --heads centroid,auto
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "out"
BACKBONE = "offline:efficientnet_lite0"


def digits_images(per_class: int, seed: int = 0):
    from PIL import Image
    from sklearn.datasets import load_digits

    d, rng = load_digits(), np.random.default_rng(seed)
    imgs, ys = [], []
    for c in range(10):
        for j in rng.permutation(np.flatnonzero(d.target == c))[:per_class]:  # as samples.make_digits
            arr = (255 - d.images[j] * (255 / 16)).astype(np.uint8)
            imgs.append(Image.fromarray(arr).resize((64, 64), Image.BILINEAR).convert("RGB"))
            ys.append(str(c))
    return imgs, ys


def photo_images(per_class: int, seed: int = 0, scale=(0.5, 1.0)):
    from embedstore import samples

    rng, imgs, ys = np.random.default_rng(seed), [], []
    for c in samples.PHOTOS:
        views = samples.photo_views(samples.photo(c), per_class, rng, 256, scale=scale)
        imgs += views
        ys += [c] * len(views)
    return imgs, ys


def features(name: str, per_class: int):
    """(X, y) for a set, embedded once and cached."""
    path = OUT / f"{name}_{per_class}_{BACKBONE.replace(':', '_')}.npz"
    if path.exists():
        z = np.load(path)
        return z["X"], z["y"]
    from embedstore.ingest.backbones import load_backbone

    if name == "digits":
        imgs, ys = digits_images(per_class)
    else:  # photos: views of 50-100% of a photo; photos-hard: patches of 15-35% (far from the ceiling)
        imgs, ys = photo_images(per_class, scale=(0.15, 0.35) if name == "photos-hard" else (0.5, 1.0))
    t = time.time()
    X = load_backbone(BACKBONE).embed_images(imgs)
    print(f"embedded {len(imgs)} {name} images in {time.time() - t:.0f}s", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=X, y=np.array(ys))
    return X, np.array(ys)


def references(n_support: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    return {
        "sk:LogisticRegression": LogisticRegression(max_iter=1000),
        "sk:KNeighbors": KNeighborsClassifier(n_neighbors=min(5, n_support)),
        "sk:NearestCentroid": NearestCentroid(),
    }


def run_set(X, y, shots_levels, episodes, heads, progress):
    from embedstore.labels.heads import make_head

    classes = np.unique(y)
    acc: dict[str, dict[int, list[float]]] = {}
    chosen: dict[int, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    for shots in shots_levels:
        for ep in range(episodes):
            rng = np.random.default_rng(1000 * shots + ep)
            sup = np.concatenate([rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes])
            qry = np.setdiff1d(np.arange(len(y)), sup)
            for name, model in references(len(sup)).items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pred = model.fit(X[sup], y[sup]).predict(X[qry])
                acc.setdefault(name, {}).setdefault(shots, []).append(float((pred == y[qry]).mean()))
            for name in heads:
                t = time.perf_counter()
                h = make_head(name).fit(X[sup], list(y[sup]), unlabeled=X[qry])
                pred = np.array(h.predict(X[qry]), dtype=object)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
                acc.setdefault(name, {}).setdefault(shots, []).append(float((pred == y[qry]).mean()))
                if name == "auto":
                    chosen.setdefault(shots, {}).setdefault(h.chosen, 0)
                    chosen[shots][h.chosen] += 1
            progress()
    means = {n: {s: float(np.mean(v)) for s, v in d.items()} for n, d in acc.items()}
    return means, chosen, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--heads", default="knn,centroid,linear,propagate,auto")
    ap.add_argument("--digits-per-class", type=int, default=100)
    ap.add_argument("--views-per-photo", type=int, default=40)
    ap.add_argument("--sets", default="digits,photos,photos-hard", help="comma-separated: digits, photos, photos-hard")
    args = ap.parse_args(argv)
    shots_levels = [int(s) for s in args.shots.split(",")]
    heads = args.heads.split(",")
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    sets = {
        name: features(name, args.digits_per_class if name == "digits" else args.views_per_photo)
        for name in args.sets.split(",")
    }
    results = {}
    with Progress(console=Console(stderr=True), transient=True) as bar:
        for set_name, (X, y) in sets.items():
            task = bar.add_task(set_name, total=len(shots_levels) * args.episodes)
            t = time.time()
            means, chosen, seconds = run_set(X, y, shots_levels, args.episodes, heads, lambda: bar.advance(task))
            refs = [n for n in means if n.startswith("sk:")]
            avg = {n: float(np.mean(list(d.values()))) for n, d in means.items()}
            best_ref = max(refs, key=avg.get)
            per_shot_best = float(np.mean([max(means[r][s] for r in refs) for s in shots_levels]))
            results[set_name] = {
                "n": len(y), "classes": len(np.unique(y)), "accuracy": means, "mean_over_shots": avg,
                "best_reference": best_ref, "best_reference_mean": avg[best_ref],
                "per_shot_best_reference_mean": per_shot_best,
                "auto_minus_best_reference": avg["auto"] - avg[best_ref] if "auto" in avg else None,
                "target_met": bool("auto" in avg and avg["auto"] >= avg[best_ref] + 0.02),
                "auto_chosen": chosen, "fit_predict_seconds_per_episode": {k: v / (len(shots_levels) * args.episodes) for k, v in seconds.items()},
                "wall_s": time.time() - t,
            }
    con = Console()
    for set_name, r in results.items():
        tab = Table(title=f"{set_name}: {r['n']} images, {r['classes']} classes, mean of {args.episodes} episodes")
        tab.add_column("head")
        for s in shots_levels:
            tab.add_column(f"{s}-shot", justify="right")
        tab.add_column("mean", justify="right")
        for n, d in r["accuracy"].items():
            tab.add_row(n, *[f"{d[s]:.3f}" for s in shots_levels], f"{r['mean_over_shots'][n]:.3f}")
        con.print(tab)
        if r["auto_minus_best_reference"] is not None:
            con.print(f"auto - best reference ({r['best_reference']}): {r['auto_minus_best_reference']:+.3f} "
                      f"(target +0.02: {'met' if r['target_met'] else 'NOT met'}); auto chose {r['auto_chosen']}")
    print(json.dumps({"benchmark": "fewshot", "backbone": BACKBONE, "episodes": args.episodes, "shots": shots_levels,
                      "sets": results}))


if __name__ == "__main__":
    main()
