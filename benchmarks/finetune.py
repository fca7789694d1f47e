"""Fine-tune benchmark: frozen heads vs the fine-tuned backbone on the UNLABELED images, per shots level and
seed, with the activation decision and the forgetting measure.

For each shots level s and seed: a copy of a digits store (scikit-learn digits, out of domain for ImageNet
EfficientNet-Lite0; plus views of 8 scikit-image photos nobody labels: the store's other domain) gets s
labels per class (chosen by the seed); every head (centroid, knn, linear, propagate, auto) is fit as
`classify` fits it and scored on the unlabeled digits with the frozen vectors; then
`finetune` runs with the store's defaults (train + re-embed + re-index + decision) and the same heads are
scored with the new version's vectors. When the default run refuses (too few labels to decide), a second
run with min_decide=0 measures the fine-tuned model anyway (never activated in the summary).

Per shots level it reports the mean and standard deviation over seeds of: the best frozen head (the best
of all heads, chosen with hindsight on the unlabeled images: an upper bound for frozen), frozen auto,
the same for the fine-tuned version, what the user ends up with (the new version if activated, else the
old one, head auto), how many seeds activated, how many of those were worse on the unlabeled images,
and near-duplicate recall@5 on unlabeled images before / after (loop/forgetting.py); on the other domain
(the photos) alone: near-duplicate recall@5 and precision@5 of views of the same photo, before / after;
the self-training's pseudo-labels: how many, how accurate on digits, how many landed on photos.

    python benchmarks/finetune.py [--per-class 60] [--shots 4 8 16] [--seeds 5] [--quick] [--opt key=value ...]

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

HEADS = ("centroid", "knn", "linear", "propagate", "auto")


def unlabeled_accuracy(store, version: str, labels: dict, truth: dict) -> dict:
    """{head: accuracy on every unlabeled image}, each head fit as `classify` fits it on that version (auto
    never cross-validated on images the backbone trained on)."""
    from embedstore.labels.heads import HEADS as KNOWN

    out = {}
    for name in HEADS:
        if name in KNOWN:
            h, vs, _, unl = store.classifying.fit_head(name, version=version)
            unl = unl[np.isin(vs.ids[unl], np.fromiter(truth, np.int64, len(truth)))]  # the labeled domain only
            pred = np.asarray(h.predict(vs.vectors[unl]), dtype=object)
            yt = np.array([truth[int(i)] for i in vs.ids[unl]], dtype=object)
            out[name] = round(float(np.mean(pred == yt)), 4)
    return out


def other_domain(store, old: str, new: str, other: dict, seed: int) -> dict:
    """Search on the store's other domain (photo views nobody labeled) under the old and the new version:
    near-duplicate recall@5 of altered views (loop/forgetting.py, sampled among those images only) and
    precision@5 of same-photo views among the whole store (views of the same object)."""
    from embedstore.ingest.backbones import load_backbone
    from embedstore.loop.forgetting import near_duplicate_recall

    st = store.storage
    a, b = st.vectors(old), st.vectors(new)
    assert np.array_equal(a.ids, b.ids)
    obj = np.array([other.get(int(i)) for i in a.ids], dtype=object)
    rows = np.flatnonzero(obj != None)  # noqa: E711

    def precision(X):
        S = X[rows] @ X.T
        S[np.arange(len(rows)), rows] = -np.inf
        top = np.argsort(-S, axis=1)[:, :5]
        return float(np.mean(obj[top] == obj[rows][:, None]))

    bbs = [load_backbone(st.version_info(v)["name"], st.weights_file(v), device="cpu") for v in (old, new)]
    exclude = {int(i) for i in a.ids if int(i) not in other}
    f = near_duplicate_recall(*bbs, a.ids, a.paths, a.vectors, b.vectors, exclude, seed=seed) or {}
    return {"other_recall_old": f.get("recall_old"), "other_recall_new": f.get("recall_new"),
            "other_p5_old": round(precision(a.vectors), 4), "other_p5_new": round(precision(b.vectors), 4)}


def one_run(base: Path, work: Path, shots: int, seed: int, truth_paths: dict, other_paths: dict, opts: dict) -> dict:
    import embedstore

    root = work / f"s{shots}-{seed}.es"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    st = embedstore.open(root, create=False)
    ids, paths, _ = st.vectors()
    truth = {int(i): truth_paths[p] for i, p in zip(ids, paths) if p in truth_paths}
    other = {int(i): other_paths[p] for i, p in zip(ids, paths) if p in other_paths}
    rng = np.random.default_rng(seed)
    labels = {}
    for c in sorted(set(truth.values())):
        members = [i for i in sorted(truth) if truth[i] == c]
        for i in rng.permutation(members)[:shots]:
            labels[int(i)] = c
    for c in sorted(set(labels.values())):
        st.label([i for i in labels if labels[i] == c], c)
    before = unlabeled_accuracy(st, st.active_version, labels, truth)
    t = time.perf_counter()
    r = st.finetune(progress=False, seed=seed, **opts)
    measured = r
    if r.status == "too-few-labels":  # measure the fine-tuned model anyway; the default run refused
        measured = st.finetune(progress=False, seed=seed, **{**opts, "min_decide": 0})
    wall = time.perf_counter() - t
    after = unlabeled_accuracy(st, measured.version, labels, truth) if measured.version else before
    pids = (st.version_info(measured.version).get("finetune") or {}).get("pseudo_ids", []) if measured.version else []
    pseudo_eval = {"pseudo_on_other": sum(int(i) in other for i in pids), "pseudo_accuracy": None}
    if pids:
        side = json.loads(st.storage.model_record_path(measured.version).read_text()).get("pseudo_labels", {})
        ok = [truth[int(i)] == c for i, c in side.items() if int(i) in truth]
        pseudo_eval["pseudo_accuracy"] = round(float(np.mean(ok)), 4) if ok else None
    dom = other_domain(st, st.version_info(measured.version)["parent"], measured.version, other, seed) \
        if measured.version and other else {}
    d, f, tr = measured.decision or {}, measured.forgetting or {}, measured.train or {}
    activated = bool(r.activated)
    return {
        "shots": shots, "seed": seed, "labels": len(labels), "unlabeled": len(truth) - len(labels),
        "frozen": before, "finetuned": after, "frozen_best": max(before.values()), "finetuned_best": max(after.values()),
        "frozen_auto": before.get("auto"), "finetuned_auto": after.get("auto"),
        "status": r.status, "activated": activated,
        "user_gets_auto": after.get("auto") if activated else before.get("auto"),
        "decision": {k: d.get(k) for k in ("estimate", "low", "high", "n", "reason")},
        "recall_old": f.get("recall_old"), "recall_new": f.get("recall_new"), "overlap": f.get("neighbour_overlap"),
        **dom, **pseudo_eval, "n_pseudo": tr.get("n_pseudo"), "pseudo": tr.get("pseudo"),
        "best_epoch": tr.get("best_epoch"), "wise_alpha": tr.get("wise_alpha"), "train_s": tr.get("seconds"),
        "wall_s": round(wall, 1),
    }


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for s in sorted({r["shots"] for r in rows}):
        rs = [r for r in rows if r["shots"] == s]

        def ms(key, rs=rs):
            v = np.array([r[key] for r in rs if r[key] is not None], float)
            return [round(float(v.mean()), 4), round(float(v.std()), 4)] if len(v) else None

        gain = np.array([r["finetuned_best"] - r["frozen_best"] for r in rs])
        gain_auto = np.array([r["finetuned_auto"] - r["frozen_best"] for r in rs])
        out.append({
            "shots": s, "seeds": len(rs), "frozen_best": ms("frozen_best"), "frozen_auto": ms("frozen_auto"),
            "finetuned_best": ms("finetuned_best"), "finetuned_auto": ms("finetuned_auto"),
            "gain_best": [round(float(gain.mean()), 4), round(float(gain.std()), 4)],
            "gain_auto": [round(float(gain_auto.mean()), 4), round(float(gain_auto.std()), 4)],
            "user_gets_auto": ms("user_gets_auto"),
            "activated": sum(r["activated"] for r in rs),
            "activated_worse": sum(r["activated"] and r["finetuned_auto"] < r["frozen_auto"] for r in rs),
            "recall_old": ms("recall_old"), "recall_new": ms("recall_new"), "overlap": ms("overlap"),
            "other_recall_old": ms("other_recall_old"), "other_recall_new": ms("other_recall_new"),
            "other_p5_old": ms("other_p5_old"), "other_p5_new": ms("other_p5_new"), "n_pseudo": ms("n_pseudo"),
            "pseudo_accuracy": ms("pseudo_accuracy"), "pseudo_on_other": ms("pseudo_on_other"),
            "statuses": sorted({r["status"] for r in rs}),
        })
    return out


def _opt(kv: str):
    k, v = kv.split("=", 1)
    if "," in v:
        return k, tuple(float(x) for x in v.split(","))
    for cast in (int, float):
        try:
            return k, cast(v)
        except ValueError:
            pass
    return k, {"none": None, "true": True, "false": False}.get(v.lower(), v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=60, help="digit images per class in the store")
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 8, 16], help="labels per class")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per shots level (label choice and training)")
    ap.add_argument("--other-per-class", type=int, default=12,
                    help="views of each of 8 scikit-image photos added unlabeled: the store's other domain (0: none)")
    ap.add_argument("--quick", action="store_true", help="small and fast: 24 images/class, 8 and 16 shots, 2 seeds")
    ap.add_argument("--opt", nargs="*", default=[], help="fine-tune options key=value (FinetuneConfig fields, method)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_class, args.shots, args.seeds = 24, [8, 16], 2
    opts = dict(_opt(o) for o in args.opt)

    import embedstore
    from embedstore.samples import make_digits, make_photo_views

    work = Path(args.workdir or tempfile.mkdtemp(prefix="es-ft-bench-"))
    imgs = work / "digits"
    truth_paths = make_digits(imgs, per_class=args.per_class, seed=1)
    other_paths = make_photo_views(work / "photos", per_class=args.other_per_class) if args.other_per_class else {}
    base = work / f"base-{args.per_class}-{args.other_per_class}.es"
    t0 = time.perf_counter()
    if not base.exists():
        embedstore.open(base, device=args.device).add([imgs] + ([work / "photos"] if other_paths else []), progress=False)
    build_s = time.perf_counter() - t0
    rows = []
    for shots in args.shots:
        if shots >= args.per_class:
            print(f"skipping {shots} shots: needs more than {args.per_class} images per class", file=sys.stderr)
            continue
        for seed in range(args.seeds):
            rows.append(one_run(base, work, shots, seed, truth_paths, other_paths, opts))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = summarize(rows)
    hdr = ["shots", "seeds", "frozen_best", "frozen_auto", "finetuned_best", "finetuned_auto", "gain_best", "gain_auto",
           "user_gets_auto", "activated", "activated_worse", "recall_old", "recall_new", "other_recall_old",
           "other_recall_new", "other_p5_old", "other_p5_new"]
    fmt = lambda v: f"{v[0]:.3f}±{v[1]:.3f}" if isinstance(v, list) else str(v)  # noqa: E731
    print(" | ".join(f"{h:>14}" for h in hdr))
    for r in summary:
        print(" | ".join(f"{fmt(r[h]):>14}" for h in hdr))
    print(json.dumps({"benchmark": "finetune", "per_class": args.per_class, "options": opts,
                      "store_build_s": round(build_s, 2), "summary": summary, "rows": rows}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
