"""Few-shot evaluation from the labels: repeated stratified episodes, a learning curve per head.

An episode at s shots draws s labeled images per class (seeded) as the support set, fits a head on
them and scores it on every other labeled image (the queries). Shots run over (1, 2, 4, 8, 16) as far as
the labels allow (every class needs s + 1 labeled images). Transductive heads see the queries plus a
fixed sample of the unlabeled collection as `unlabeled`, as they would in `classify`.

Each run is stored as one row of table `evals` (run_id, time, version, n_labels, n_classes, best_head,
best_accuracy, results JSON); `eval_history()` returns them for the fine-tune stage's plateau rule.
`best_head` is the head with the highest mean accuracy at the largest shot count evaluated.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections import defaultdict
from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

from embedstore.clock import now_iso
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.labels.heads import HEADS
from embedstore.progress import progress_bar
from embedstore.results import EvalRun
from embedstore.storage import Storage

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
TEXT_HEADS = ("zeroshot", "fused")


def applicable_heads(has_text: bool) -> list[str]:
    return [h for h in HEADS if has_text or h not in TEXT_HEADS]


def run_episodes(
    X: np.ndarray,
    y: Sequence[str],
    make_head,
    heads: Sequence[str],
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = 10,
    seed: int = 0,
    unlabeled: np.ndarray | None = None,
    max_queries: int = 2000,
    progress=None,
) -> dict:
    """Accuracy of each head per shot count over `episodes` seeded stratified episodes.

    Returns {"shots": [...], "heads": {head: {shot: {"mean", "std", "episodes"}}}, "errors": {head: msg},
    "chosen": {shot: {name: count}} (what auto picked)}. Pure arrays in, plain dict out.
    """
    y = np.asarray([str(c) for c in y], dtype=object)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise EmptyInputError("evaluation needs labels of at least two classes; label a few images of another class")
    by_class = {c: np.flatnonzero(y == c) for c in classes}
    smallest = min(by_class, key=lambda c: len(by_class[c]))
    ok = sorted({int(s) for s in shots if 1 <= int(s) < len(by_class[smallest])})
    if not ok:
        raise EmptyInputError(
            f"class {smallest!r} has only {len(by_class[smallest])} labeled image(s); evaluation needs at least 2 "
            "per class (1 to learn from, 1 to test on)"
        )
    rng = np.random.default_rng(seed)
    acc: dict[str, dict[int, list[float]]] = {h: defaultdict(list) for h in heads}
    errors: dict[str, str] = {}
    chosen: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    confusion: dict[str, np.ndarray] = {}  # per head, summed over the episodes at the largest shot count
    for s in ok:
        for _ in range(episodes):
            support = np.concatenate([rng.choice(by_class[c], s, replace=False) for c in classes])
            query = np.setdiff1d(np.arange(len(y)), support)
            if len(query) > max_queries:
                query = rng.choice(query, max_queries, replace=False)
            pool = X[query] if unlabeled is None or len(unlabeled) == 0 else np.vstack([X[query], unlabeled])
            for name in heads:
                if name in errors:
                    progress and progress(1)
                    continue
                try:
                    h = make_head(name)
                    h.fit(X[support], list(y[support]), unlabeled=pool)
                    pred = np.asarray(h.predict(X[query]), dtype=object)
                except Exception as e:  # one failing head must not sink the others' curves
                    errors[name] = f"{type(e).__name__}: {e}"
                    progress and progress(1)
                    continue
                acc[name][s].append(float(np.mean(pred == y[query])))
                if s == ok[-1]:
                    m = confusion_matrix(list(y[query]), list(pred), labels=classes)
                    confusion[name] = confusion.get(name, 0) + m
                if getattr(h, "chosen", None):
                    chosen[s][str(h.chosen)] += 1
                progress and progress(1)
    out = {
        h: {str(s): {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4), "episodes": len(v)} for s, v in sorted(d.items())}
        for h, d in acc.items()
        if h not in errors
    }
    return {
        "shots": ok,
        "heads": out,
        "errors": errors,
        "chosen": {str(s): dict(c) for s, c in chosen.items()},
        "classes": classes,
        "confusions": {h: m.astype(int).tolist() for h, m in confusion.items() if h not in errors},
    }


def evaluate(
    clf,
    shots: Sequence[int] = DEFAULT_SHOTS,
    episodes: int = 10,
    heads: Sequence[str] | None = None,
    seed: int = 0,
    max_unlabeled: int = 2000,
    progress: bool = False,
    save: bool = True,
) -> EvalRun:
    """Run the episodes on the store's labels (active version) and store the run in table `evals`."""
    t0 = time.perf_counter()
    if episodes < 1:
        raise InvalidArgumentError(f"episodes must be at least 1, got {episodes}")
    possible = applicable_heads(clf.has_text())
    if heads is None:
        heads = possible
    else:
        heads = list(heads)
        bad = [h for h in heads if h not in HEADS]
        if bad:
            raise InvalidArgumentError(f"unknown head(s) {', '.join(bad)}; choose from: {', '.join(HEADS)}")
        for h in heads:
            if h in TEXT_HEADS:
                clf.make_head(h)  # raises NotSupportedError without a text tower
    vs, lab, y, unl = clf.labeled_split()
    rng = np.random.default_rng(seed)
    U = vs.vectors[rng.choice(unl, min(len(unl), max_unlabeled), replace=False)] if len(unl) else None
    counts = [y.count(c) for c in set(y)]
    total = len([s for s in shots if 1 <= s < min(counts)]) * episodes * len(heads)
    with progress_bar(total, "evaluating", progress, unit="fits") as advance:
        res = run_episodes(
            vs.vectors[lab], y, clf.make_head, heads, shots=shots, episodes=episodes, seed=seed, unlabeled=U, progress=advance
        )
    last = str(res["shots"][-1])
    ranked = sorted(res["heads"], key=lambda h: -res["heads"][h][last]["mean"])
    best = ranked[0] if ranked else None
    confusions = res.pop("confusions")
    run = {
        "run_id": uuid.uuid4().hex[:12],
        "time": now_iso("microseconds"),
        "version": vs.version,
        "n_labels": int(len(lab)),
        "n_classes": len(set(y)),
        "class_counts": {c: y.count(c) for c in sorted(set(y))},
        "episodes": episodes,
        "seed": seed,
        **res,
        "best_head": best,
        "best_accuracy": res["heads"][best][last]["mean"] if best else None,
        "best_shots": int(last),
        # rows: true class, columns: predicted, summed over the episodes at best_shots, for the best head
        "confusion": {"head": best, "shots": int(last), "classes": res["classes"], "matrix": confusions.get(best)}
        if best
        else None,
        "mean_accuracy": {h: round(float(np.mean([v["mean"] for v in d.values()])), 4) for h, d in res["heads"].items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if save:
        _store_run(clf.storage, run)
    return EvalRun.from_dict(run)


def _store_run(storage: Storage, run: dict) -> None:
    row = {
        "run_id": run["run_id"],
        "time": dt.datetime.fromisoformat(run["time"]),
        "version": run["version"],
        "n_labels": run["n_labels"],
        "n_classes": run["n_classes"],
        "best_head": run["best_head"],
        "best_accuracy": run["best_accuracy"],
        "results": json.dumps(run),
    }
    with storage.write_lock():
        storage.add_rows("evals", [row])


def eval_history(storage: Storage, version: str | None = None) -> list[EvalRun]:
    """Stored runs, oldest first. version: None = active, "all" = every version."""
    t = storage.read_table("evals", ["version", "time", "results"])
    if t is None:
        return []
    want = storage.active_version if version is None else version
    rows = sorted((r for r in t.to_pylist() if want == "all" or r["version"] == want), key=lambda r: r["time"])
    return [EvalRun.from_dict(json.loads(r["results"])) for r in rows]
