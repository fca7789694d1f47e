"""How long `classify` takes after a new class appears, on a collection of N vectors (default 100k).

Synthetic clustered vectors (C old classes + 1 new, `--shots` labels each) stand in for a collection;
two measures, in one run:
  1. heads, store-free: for each head, the time to make the new class predictable —
       add_class(new examples) then predict_proba over all N vectors (the in-place path), and
       fit on all labels again then predict over N (what `store.classify` does);
     plus accuracy on the new class's unlabeled vectors.
  2. store end-to-end: a real store whose LanceDB vectors table holds the N vectors (written
     directly, no images embedded), `store.label(new examples, "new")` then `store.classify(head=...)`,
     timed as a user sees it (reading the vectors, fitting, predicting, persisting N predictions).
Prints a table, then one JSON line.

    python benchmarks/classify_newclass.py                          # 100k x 1280, ~1-2 min on 2 cores
    python benchmarks/classify_newclass.py --n 20000 --heads knn,centroid
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import embedstore
from embedstore.labels.heads import make_head
from synthetic_store import write_vectors

BACKBONE = "offline:efficientnet_lite0"  # 1280-d, packaged weights; only the store's metadata is used


def clustered(n: int, dim: int, n_classes: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n)
    X = centres[y] + rng.normal(scale=spread / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


def make_store(root: Path, X: np.ndarray):
    """A store whose vectors table holds X (ids 0..N-1), written straight into LanceDB."""
    return write_vectors(embedstore.open(root, backbone=BACKBONE, device="cpu"), X)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280, help="1280 = the default backbone's (EfficientNet-Lite0)")
    ap.add_argument("--classes", type=int, default=20, help="classes labeled before the new one")
    ap.add_argument("--shots", type=int, default=5, help="labels per class (the new class too)")
    ap.add_argument("--spread", type=float, default=3.0, help="noise norm relative to the unit class centre")
    ap.add_argument("--heads", default="knn,centroid,linear,auto", help="heads for part 1")
    ap.add_argument("--store-heads", default="knn,centroid", help="heads for part 2 (store end-to-end)")
    ap.add_argument("--no-store", action="store_true", help="skip part 2")
    args = ap.parse_args()

    X, y = clustered(args.n, args.dim, args.classes + 1, args.spread)
    new = args.classes  # the last class appears later
    rng = np.random.default_rng(1)
    lab = np.concatenate([rng.choice(np.flatnonzero(y == c), args.shots, replace=False) for c in range(args.classes + 1)])
    old_lab, new_lab = lab[y[lab] != new], lab[y[lab] == new]
    unl = np.setdiff1d(np.arange(args.n), lab)
    U = X[np.random.default_rng(2).choice(unl, min(len(unl), 5_000), replace=False)]  # as classify's max_unlabeled
    names = np.array([f"c{c}" for c in range(args.classes)] + ["new"])
    test_new = unl[y[unl] == new]

    rows = []
    for name in [h for h in args.heads.split(",") if h]:
        h, t_fit_old = timed(lambda: make_head(name).fit(X[old_lab], names[y[old_lab]], unlabeled=U))
        try:
            _, t_add = timed(lambda: h.add_class(X[new_lab], "new"))
            P, t_pred = timed(lambda: h.predict_proba(X))
            acc_add = float(np.mean(np.asarray(h.classes)[P[test_new].argmax(1)] == "new"))
        except NotImplementedError:
            t_add = t_pred = acc_add = None
        def refit():
            g = make_head(name).fit(X[lab], names[y[lab]], unlabeled=U)
            return g, g.predict_proba(X)
        (g, P2), t_refit = timed(refit)
        acc_refit = float(np.mean(np.asarray(g.classes)[P2[test_new].argmax(1)] == "new"))
        rows.append({
            "head": name if not getattr(g, "chosen", "") else f"{name} ({g.chosen})",
            "fit_before_s": round(t_fit_old, 3),
            "add_class_ms": None if t_add is None else round(t_add * 1e3, 2),
            "predict_all_s": None if t_pred is None else round(t_pred, 3),
            "add_then_predict_s": None if t_add is None else round(t_add + t_pred, 3),
            "new_class_acc_add": None if acc_add is None else round(acc_add, 4),
            "refit_and_predict_s": round(t_refit, 3),
            "new_class_acc_refit": round(acc_refit, 4),
        })

    store_rows = []
    if not args.no_store:
        with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
            store, t_write = timed(lambda: make_store(Path(tmp) / "bench.es", X))
            for c in range(args.classes):
                store.label([int(i) for i in old_lab[y[old_lab] == c]], f"c{c}")
            heads = [h for h in args.store_heads.split(",") if h]
            store.classify(head=heads[0])  # before the new class (also warms the file cache)
            _, t_label = timed(lambda: store.label([int(i) for i in new_lab], "new"))
            _, t_read = timed(lambda: store.vectors())
            for name in heads:
                res, t_cls = timed(lambda: store.classify(head=name))
                got = {p.id: p.label for p in res.predictions}
                acc = float(np.mean([got[int(i)] == "new" for i in test_new]))
                store_rows.append({
                    "head": name if res.chosen == name else f"{name} ({res.chosen})", "label_new_class_s": round(t_label, 3), "read_vectors_s": round(t_read, 3),
                    "classify_s": round(t_cls, 3), "predictions": len(res.predictions), "new_class_acc": round(acc, 4),
                })

    print(f"classify after a new class: N={args.n} x {args.dim}, {args.classes} old classes + 1 new, "
          f"{args.shots} labels each, {os.cpu_count()} CPUs")
    print("\n1. heads (store-free)")
    cols = ["head", "fit_before_s", "add_class_ms", "predict_all_s", "add_then_predict_s", "new_class_acc_add",
            "refit_and_predict_s", "new_class_acc_refit"]
    print("  ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):>20}" for c in cols))
    if store_rows:
        print("\n2. store end-to-end (label the new class, then store.classify over every unlabeled vector)")
        cols2 = ["head", "label_new_class_s", "read_vectors_s", "classify_s", "predictions", "new_class_acc"]
        print("  ".join(f"{c:>18}" for c in cols2))
        for r in store_rows:
            print("  ".join(f"{str(r[c]):>18}" for c in cols2))
    print(json.dumps({
        "benchmark": "classify_newclass", "n": args.n, "dim": args.dim, "classes": args.classes, "shots": args.shots,
        "cpu_count": os.cpu_count(), "heads": rows, "store": store_rows,
    }))


if __name__ == "__main__":
    main()
