"""Plateau benchmark (issue 12): does the plateau rule see the learning curve the collection sees?

The plateau rule (embedstore.loop.plateau) calls a plateau when the accuracy it reads gained less than 0.01 over
the last 2 label additions. Along rounds of labels (2, 3, 4, 5, 6, 8 per class, from 1 random label per class;
each round by `suggest`, or stratified random), after each round:
  episodes   what `eval` reports as best_accuracy: the best head's mean accuracy over episodes at the largest
             shot count the labels allow, tested on held-out labels
  estimate   eval's unlabeled_estimate (evaluate.estimate_unlabeled)
  truth      auto's accuracy on the unlabeled rest
For every round with two rounds before it, a plateau is "false" when the rule fires on that reading while the
truth gained at least the margin ("both": it fires only when both readings gained less, as the rule does when
eval has an estimate), "missed" when it does not fire though the truth gained less. Uses fewshot.py's cached collections (benchmarks/out/). Prints a table and one
JSON line.

    python benchmarks/plateau.py                                  # digits, glyphs, icons; ~10 min on 2 cores
    python benchmarks/plateau.py --sets glyphs --kinds random --seeds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import fewshot  # noqa: E402

MARGIN, WINDOW = 0.01, 2


def curve(X, y, kind: str, seed: int, episodes: int) -> list[dict]:
    from embedstore.errors import EmptyInputError
    from embedstore.labels.evaluate import applicable_heads, run_episodes
    from embedstore.labels.heads import make_head
    from embedstore.labels.suggest import rank

    classes = np.unique(y)
    lab = list(fewshot.stratified(y, classes, 1, np.random.default_rng(1000 + seed)))
    rng = np.random.default_rng(5000 + seed)
    out = []
    for budget in fewshot.AL_BUDGETS:
        if kind == "suggest":
            unl = np.setdiff1d(np.arange(len(y)), lab)
            lab += [int(unl[p["row"]]) for p in rank(X[lab], list(y[lab]), X[unl], budget * len(classes) - len(lab), make_head)]
        else:  # stratified random additions to the same labels
            for c in classes:
                pool = np.setdiff1d(np.flatnonzero(y == c), lab)
                lab += [int(i) for i in rng.choice(pool, budget - int(np.sum(y[lab] == c)), replace=False)]
        L = np.array(lab)
        unl = np.setdiff1d(np.arange(len(y)), L)
        U = X[np.random.default_rng(0).choice(unl, min(len(unl), 2000), replace=False)]
        try:  # as `eval` does: every head, the largest shot count the labels allow
            res = run_episodes(X[L], list(y[L]), make_head, applicable_heads(False), episodes=episodes, unlabeled=U)
            best = max(v[str(res["shots"][-1])]["mean"] for v in res["heads"].values())
        except EmptyInputError:  # a class with a single label: eval refuses, so the rule has no point here
            best = None
        h, unl = fewshot.fit_auto(X, y, L)  # one auto fit serves the truth and the estimate
        truth = float(np.mean(np.asarray(h.predict(X[unl]), dtype=object) == y[unl]))
        est = fewshot.estimate_error(X, y, L, h, unl, truth)
        out.append({"budget": budget, "episodes": best, "estimate": est and est["estimate"], "truth": truth})
    return out


def false_plateaus(curves: list[list[dict]]) -> dict:
    """Per reading: rounds where the rule fired though the truth gained >= MARGIN, out of the rounds it could judge."""
    r = {"points": 0, "true_plateaus": 0}
    r.update({f"{k}_{w}": 0 for k in ("episodes", "estimate", "both") for w in ("false", "missed")})
    for c in curves:
        for a, b in zip(c, c[WINDOW:]):
            if any(p[k] is None for p in (a, b) for k in ("episodes", "estimate")):
                continue
            true_plateau = b["truth"] - a["truth"] < MARGIN
            r["points"] += 1
            r["true_plateaus"] += true_plateau
            fired = {k: b[k] - a[k] < MARGIN for k in ("episodes", "estimate")}
            fired["both"] = fired["episodes"] and fired["estimate"]  # what the rule does when eval has both
            for k, f in fired.items():
                r[f"{k}_false"] += f and not true_plateau
                r[f"{k}_missed"] += true_plateau and not f
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="digits,glyphs,icons")
    ap.add_argument("--kinds", default="suggest,random")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=5, help="eval episodes per shot count (eval's default is 10)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from rich.console import Console
    from rich.table import Table

    results, t0 = {}, time.time()
    for name in args.sets.split(","):
        X, y = fewshot.features(name)
        for kind in args.kinds.split(","):
            curves = [curve(X, y, kind, s, args.episodes) for s in range(args.seeds)]
            vals = {k: {b: [p[k] for c in curves for p in c if p["budget"] == b and p[k] is not None] for b in fewshot.AL_BUDGETS}
                    for k in ("episodes", "estimate", "truth")}
            mean = {k: {b: float(np.mean(v)) if v else None for b, v in d.items()} for k, d in vals.items()}  # None: eval refused
            results[f"{name}/{kind}"] = {"curve": mean, **false_plateaus(curves)}
    tab = Table(title=f"plateau rule (gain < {MARGIN} over {WINDOW} additions), {args.seeds} seeds")
    for col in ("collection / labels", "points", "true plateaus", "false: episodes", "false: estimate", "false: both", "missed: both", "episodes 3 → 8/cl",
                "estimate 3 → 8/cl", "truth 3 → 8/cl"):
        tab.add_column(col)
    for key, r in results.items():
        c = r["curve"]
        tab.add_row(key, str(r["points"]), str(r["true_plateaus"]), str(r["episodes_false"]), str(r["estimate_false"]),
                    str(r["both_false"]), str(r["both_missed"]),
                    *[" → ".join("–" if c[k][b] is None else f"{c[k][b]:.3f}" for b in (3, 8)) for k in ("episodes", "estimate", "truth")])
    Console().print(tab)
    print(json.dumps({"benchmark": "plateau", "backbone": fewshot.BACKBONE, "seeds": args.seeds, "episodes": args.episodes,
                      "margin": MARGIN, "window": WINDOW, "wall_s": round(time.time() - t0, 1), "results": results}))


if __name__ == "__main__":
    main()
