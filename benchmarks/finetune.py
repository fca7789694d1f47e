"""Fine-tune benchmark: few-shot accuracy before/after `finetune`, per shots level, and wall time.

For each shots level s: a copy of a digits store (scikit-learn digits, out-of-domain for ImageNet
EfficientNet-Lite0) gets s labels per class from the folder names; the frozen backbone's accuracy on the
UNLABELED images (ground truth from the folders, heads fit on the labels) is measured, then `finetune`
runs (train + re-embed + re-index + decision), then the same accuracy on the new version's vectors.

    python benchmarks/finetune.py [--per-class 30] [--shots 5 10 20] [--method lora] [--epochs 10] [--device auto]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def unlabeled_accuracy(store, version: str, labels: dict, truth: dict) -> dict:
    """Best of centroid / knn / linear heads fit on the labels, scored on every unlabeled image."""
    from embedstore.labels.heads import HEADS, make_head

    ids, _, X = store.vectors(version)
    lab = np.array([int(i) in labels for i in ids])
    y = [labels[int(i)] for i in ids[lab]]
    yt = np.array([truth[int(i)] for i in ids[~lab]], dtype=object)
    out = {}
    for name in ("centroid", "knn", "linear"):
        if name in HEADS:
            h = make_head(name).fit(X[lab], y)
            out[name] = float(np.mean(np.asarray(h.predict(X[~lab]), dtype=object) == yt))
    best = max(out, key=out.get)
    return {"accuracy": round(out[best], 4), "head": best, "heads": {k: round(v, 4) for k, v in out.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=30, help="digit images per class in the store")
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20], help="labels per class, one run each")
    ap.add_argument("--method", default="lora", choices=["lora", "last-blocks", "full"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    import embedstore
    from embedstore.samples import make_digits

    work = Path(args.workdir or tempfile.mkdtemp(prefix="es-ft-bench-"))
    imgs = work / "digits"
    truth_paths = make_digits(imgs, per_class=args.per_class, seed=1)
    base = work / "base.es"
    t0 = time.perf_counter()
    s = embedstore.open(base, device=args.device)
    s.add([imgs], progress=False)
    build_s = time.perf_counter() - t0
    rows = []
    for shots in args.shots:
        if shots >= args.per_class:
            print(f"skipping {shots} shots: needs more than {args.per_class} images per class", file=sys.stderr)
            continue
        root = work / f"s{shots}.es"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        st = embedstore.open(root, create=False, device=args.device)
        ids, paths, _ = st.vectors()
        truth = {int(i): truth_paths[p] for i, p in zip(ids, paths)}
        by_class: dict[str, list[int]] = {}
        for i in sorted(truth):
            by_class.setdefault(truth[i], []).append(i)
        labels = {i: c for c, members in by_class.items() for i in members[:shots]}
        for c in by_class:
            st.label([i for i in labels if labels[i] == c], c)
        before = unlabeled_accuracy(st, st.active_version, labels, truth)
        t = time.perf_counter()
        r = st.finetune(method=args.method, epochs=args.epochs, progress=False)
        wall = time.perf_counter() - t
        after = unlabeled_accuracy(st, r.version, labels, truth) if r.version else before
        tr = r.train or {}
        rows.append(
            {
                "shots": shots,
                "labels": len(labels),
                "images": len(truth),
                "before": before["accuracy"],
                "after": after["accuracy"],
                "gain": round(after["accuracy"] - before["accuracy"], 4),
                "head_before": before["head"],
                "head_after": after["head"],
                "status": r.status,
                "holdout_before": (r.holdout or {}).get("parent", {}).get("accuracy"),
                "holdout_after": (r.holdout or {}).get("new", {}).get("accuracy"),
                "epochs_run": tr.get("epochs_run"),
                "train_s": tr.get("seconds"),
                "train_img_s": tr.get("images_per_second"),
                "embed_s": r.embed_seconds,
                "wall_s": round(wall, 2),
                "device": tr.get("device"),
            }
        )
    hdr = ["shots", "labels", "before", "after", "gain", "status", "holdout_before", "holdout_after", "epochs_run", "train_s", "embed_s", "wall_s"]
    print(" | ".join(f"{h:>14}" for h in hdr))
    for r in rows:
        print(" | ".join(f"{str(r[h]):>14}" for h in hdr))
    print(json.dumps({"benchmark": "finetune", "method": args.method, "per_class": args.per_class,
                      "store_build_s": round(build_s, 2), "rows": rows}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
