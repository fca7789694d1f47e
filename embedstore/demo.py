"""`embedstore demo`: offline, CPU, about a minute. Builds a store from views of scikit-image's bundled
photos with the packaged EfficientNet-Lite0 backbone, then searches, labels a few, classifies the rest,
and adds a brand-new class — each step through the same Python API the CLI and UI use.

Run again it rebuilds its directories, but only while they hold nothing but what it made: the marker
file records the labels it gave, and labels or eval runs added since make it refuse (unless force=True).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import embedstore
from embedstore.errors import EmbedstoreError, InvalidArgumentError
from embedstore.samples import make_digits, make_photo_views

MARKER = ".embedstore-demo"


def _remember(store_dir: Path, store) -> None:
    """Record in the marker what the demo made (its labels, its eval runs: none), to compare on a rerun."""
    made = {"labels": {str(i): c for i, c in store.labels(source=None).items()},
            "evals": [r.run_id for r in store.eval_history("all")]}
    (store_dir / MARKER).write_text(json.dumps(made))


def _check_only_demo_work(store_dir: Path) -> None:
    """Refuse to delete a demo store that holds labels or eval runs the demo did not make."""
    hint = "pass --force to rebuild it anyway, or another directory (embedstore demo OTHER.es)"
    try:
        made = json.loads((store_dir / MARKER).read_text() or "{}")
        made = made if isinstance(made, dict) else {}
        store = embedstore.open(store_dir, create=False)
        labels = store.labels(source=None)
        runs = [r.run_id for r in store.eval_history("all")]
    except (EmbedstoreError, OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot check what {store_dir} holds ({str(e).splitlines()[0][:120]}); {hint}") from None
    theirs = {i: c for i, c in labels.items() if made.get("labels", {}).get(str(i)) != c}
    new_runs = [r for r in runs if r not in set(made.get("evals", []))]
    if theirs or new_runs:
        raise InvalidArgumentError(
            f"{store_dir} holds {len(theirs)} label(s) and {len(new_runs)} eval run(s) the demo did not make, which "
            f"rebuilding would delete; {hint}"
        )


def run_demo(store_dir: str | Path = "demo.es", progress: bool = True, say: Callable[[str], None] = print,
             force: bool = False) -> dict:
    """Build the demo store; a rerun rebuilds it, unless it holds labels/evals added since (force=True: anyway)."""
    t0 = time.perf_counter()
    store_dir = Path(store_dir).expanduser().resolve()
    images_dir = store_dir.parent / (store_dir.name.removesuffix(".es") + "-images")
    for d in (store_dir, images_dir):
        if d.exists() and not (d / MARKER).exists():
            raise InvalidArgumentError(f"{d} exists and was not made by the demo; pass another directory")
    if store_dir.exists() and not force:
        _check_only_demo_work(store_dir)
    for d in (store_dir, images_dir):
        if d.exists():
            shutil.rmtree(d)
    report: dict = {"store": str(store_dir), "images_dir": str(images_dir)}

    say(f"[bold]1/5[/] making sample images in {images_dir} (views of scikit-image's bundled photos)")
    truth = make_photo_views(images_dir / "photos", per_class=12, seed=0)
    (images_dir / MARKER).touch()

    say("[bold]2/5[/] embedding them with offline:efficientnet_lite0 (packaged ImageNet weights, CPU)")
    store = embedstore.open(store_dir, backbone="offline:efficientnet_lite0", device="cpu")
    _remember(store_dir, store)
    res = store.add([images_dir / "photos"], progress=progress)
    report["add"] = res.to_dict()
    say(f"    added {res.added} images at {res.images_per_second:.1f} img/s")

    query = sorted(p for p in truth if truth[p] == "chelsea")[0]
    hits = store.search(image=query, k=6)
    same = sum(truth.get(h.path) == "chelsea" for h in hits[1:])
    report["search"] = {"query": query, "hits": [{"path": h.path, "score": round(h.score, 3)} for h in hits]}
    say(f"[bold]3/5[/] search by image: the query comes back first (score {hits[0].score:.3f}); "
        f"{same} of the next {len(hits) - 1} neighbours are views of the same photo")

    shots = 2
    picked: dict[str, list[str]] = {}
    for p in sorted(truth):
        picked.setdefault(truth[p], [])
        if len(picked[truth[p]]) < shots:
            picked[truth[p]].append(p)
    for cls, ps in picked.items():
        store.label(ps, cls)
    _remember(store_dir, store)
    out = store.classify(head="auto")
    preds = out.predictions
    correct = sum(truth.get(p.path) == p.label for p in preds)
    report["classify"] = {"labeled": shots * len(picked), "predicted": len(preds), "correct": correct,
                          "accuracy": round(correct / max(1, len(preds)), 3), "head": out.chosen, "reason": out.reason}
    say(f"[bold]4/5[/] labeled {shots} images per class ({len(picked)} classes); head "
        f"'{report['classify']['head']}' labeled the other {len(preds)}: {correct} correct "
        f"({100 * correct / max(1, len(preds)):.0f}%)")

    digits = make_digits(images_dir / "digits", per_class=6, seed=0, size=128)
    some = [p for p in digits if digits[p] in ("3",)]
    store.add(some, progress=False)
    t1 = time.perf_counter()
    store.label(some[:3], "handwritten-digit")
    _remember(store_dir, store)
    out = store.classify(head="centroid")
    new_ok = sum(p.label == "handwritten-digit" for p in out.predictions if p.path in some[3:])
    report["new_class"] = {"labeled": 3, "recognised": new_ok, "of": len(some) - 3,
                           "seconds": round(time.perf_counter() - t1, 3)}
    say(f"[bold]5/5[/] new class 'handwritten-digit' from 3 labels, no retraining: "
        f"{new_ok}/{len(some) - 3} of its other images recognised in {report['new_class']['seconds']:.2f}s")

    report["info"] = store.info().to_dict()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"\ndone in {report['seconds']}s. Store: {store_dir}. Try next:")
    say(f"  embedstore info {store_dir}")
    say(f"  embedstore search {store_dir} --image {sorted(truth)[0]} -k 5")
    say(f"  embedstore suggest {store_dir} -n 8")
    say(f"  embedstore ui {store_dir}")
    return report
