"""label, unlabel, labels, classify, suggest, eval, export — thin wrappers over the Store's labeling API."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedstore.errors import InvalidArgumentError

from .common import JSON_OPT, STORE_ARG, console, emit_json, handle_errors, open_store, out
from .common import parse_ints as _ints


def _print_unknown(res) -> None:
    """The items of a LabelResult / UnlabelResult that are not in the store."""
    if res.unknown_count:
        out.print(f"[yellow]{res.unknown_count} not in the store[/] (add them first with `embedstore add`):", highlight=False)
        for u in res.unknown[:20]:
            out.print(f"  [yellow]unknown[/] {u}", highlight=False)
        if res.unknown_count > 20:
            out.print(f"  ... and {res.unknown_count - 20} more (see --json)")


@handle_errors
def label(
    store: Path = STORE_ARG,
    items: Optional[List[str]] = typer.Argument(None, help="Image paths or folders (absolute or relative to here).", show_default=False),
    cls: Optional[str] = typer.Option(None, "--class", "-c", help="Class to give the images (created on first use)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Image ids, comma-separated (instead of / besides paths)."),
    csv_: Optional[Path] = typer.Option(None, "--csv", help="CSV with columns path,label (paths relative to the CSV's folder)."),
    folders: Optional[Path] = typer.Option(None, "--folders", help="ImageFolder layout DIR/<class>/<image>."),
    source: str = typer.Option("human", "--source", help="human, or model (accepted predictions)."),
    json_: bool = JSON_OPT,
):
    """Label images of STORE: --class NAME with paths/ids, or --csv FILE, or --folders DIR."""
    modes = sum([cls is not None, csv_ is not None, folders is not None])
    if modes != 1:
        raise InvalidArgumentError("pass exactly one of --class NAME (with images), --csv FILE or --folders DIR")
    if cls is None and (items or ids):
        raise InvalidArgumentError("images on the command line need --class NAME; --csv and --folders name their own")
    s = open_store(store)
    if csv_ is not None:
        res = s.label_csv(csv_, source=source)
    elif folders is not None:
        res = s.label_folders(folders, source=source)
    else:
        targets = list(items or []) + (_ints(ids, "--ids") or [])
        res = s.label(targets, cls, source=source)
    if json_:
        emit_json(res.to_dict())
        return
    if res.label is not None:
        what = f"as [bold]{res.label}[/]"
    else:
        what = "in " + ", ".join(f"{c} ({n})" for c, n in (res.per_class or {}).items())
    out.print(
        f"labeled [bold]{res.labeled}[/] images {what}"
        + (f", relabeled {res.relabeled}" if res.relabeled else "")
        + (f", {res.unchanged} unchanged" if res.unchanged else "")
        + (f"; new class: {', '.join(res.new_classes)}" if res.new_classes else ""),
        highlight=False,
    )
    if res.skipped_rows:
        out.print(f"  [yellow]skipped {res.skipped_rows} CSV row(s)[/] with an empty path or label", highlight=False)
    _print_unknown(res)


@handle_errors
def unlabel(
    store: Path = STORE_ARG,
    items: Optional[List[str]] = typer.Argument(None, help="Image paths or folders.", show_default=False),
    ids: Optional[str] = typer.Option(None, "--ids", help="Image ids, comma-separated."),
    cls: Optional[str] = typer.Option(None, "--class", "-c", help="Remove every label of this class."),
    json_: bool = JSON_OPT,
):
    """Remove labels of images (paths/ids) or of a whole class."""
    s = open_store(store)
    res = s.unlabel(list(items or []) + (_ints(ids, "--ids") or []), cls=cls)
    if json_:
        emit_json(res.to_dict())
        return
    out.print(f"removed [bold]{res.unlabeled}[/] labels", highlight=False)
    _print_unknown(res)


@handle_errors
def labels(store: Path = STORE_ARG, json_: bool = JSON_OPT):
    """Show classes with their label counts."""
    s = open_store(store)
    rows = s.labels_table().to_pylist()
    counts = s.class_counts()
    if json_:
        emit_json(
            {
                "classes": counts,
                "n_labels": len(rows),
                "labels": [{k: (str(v) if k == "time" else v) for k, v in r.items()} for r in rows],
            }
        )
        return
    from rich.table import Table

    by_src = {}
    for r in rows:
        by_src.setdefault(r["label"], {"human": 0, "model": 0})[r["source"]] += 1
    t = Table("class", "labels", "human", "model")
    for c, n in counts.items():
        t.add_row(c, str(n), str(by_src[c]["human"]), str(by_src[c]["model"]))
    out.print(t)
    out.print(f"{len(rows)} labeled images in {len(counts)} classes")


@handle_errors
def classify(
    store: Path = STORE_ARG,
    head: str = typer.Option("auto", "--head", help="auto, knn, centroid, linear, propagate, zeroshot, fused."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="Below this confidence the label is unknown (null)."),
    explain: bool = typer.Option(False, "--explain", help="Add the nearest labeled examples to each prediction."),
    show: int = typer.Option(20, "--show", min=0, help="Predictions to list (least confident first); the JSON has all."),
    engine: str = typer.Option("local", "--engine", help="local, or ray: predict in Ray tasks over the vectors table (huge stores; predictions written in chunks)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster (auto = the running one); default: a local Ray."),
    json_: bool = JSON_OPT,
):
    """Predict a class for every unlabeled image from the labels; --json prints the list of predictions."""
    s = open_store(store)
    res = s.classify(head=head, threshold=threshold, explain=explain, engine=engine, address=address)
    if res.predicted is not None and res.predicted > len(res.predictions):
        console.print(f"{res.predicted} predictions written to the store; listed: the {len(res.predictions)} least "
                      "confident (all of them: embedstore export STORE OUT.csv --include predictions)", highlight=False, soft_wrap=True)
    if res.skipped_reason:  # on stderr: with --json, stdout holds the predictions only
        (console if json_ else out).print(f"[yellow]warning:[/] {res.skipped_reason}", highlight=False, soft_wrap=True)
    if json_:
        emit_json([p.to_dict() for p in res.predictions])
        return
    from rich.table import Table

    preds = sorted(res.predictions, key=lambda p: p.confidence)
    if show and preds:
        t = Table("id", "path", "label", "confidence", *(["nearest labeled"] if explain else []), title="least confident first")
        for p in preds[:show]:
            extra = [", ".join(f"{e.label} {e.similarity:.2f}" for e in p.explain["neighbors"])] if explain and p.explain else []
            t.add_row(str(p.id), p.path, p.label or "[yellow]unknown[/]", f"{p.confidence:.3f}", *extra)
        out.print(t)
    t = Table("class", "predicted", "mean confidence", title=f"head {res.chosen} (asked: {res.head})")
    for c, d in res.per_class.items():
        t.add_row(c, str(d.count), "-" if d.mean_confidence is None else f"{d.mean_confidence:.3f}")
    if res.threshold is not None:
        t.add_row("[yellow]unknown[/]", str(res.unknown), f"< {res.threshold}")
    out.print(t)
    if res.reason:
        out.print(res.reason, highlight=False, soft_wrap=True)  # why this head (auto explains its choice)
    n = res.predicted if res.predicted is not None else len(preds)
    out.print(f"{n} predictions from {res.n_labels} labels in {res.seconds:.2f}s", highlight=False)


@handle_errors
def suggest(
    store: Path = STORE_ARG,
    n: int = typer.Option(24, "-n", "--n", min=1, help="How many images to suggest."),
    head: str = typer.Option("linear", "--head", help="Head whose margins (uncertainty) guide the choice."),
    reasons: bool = typer.Option(False, "--reasons", help="Show why each image was picked."),
    json_: bool = JSON_OPT,
):
    """Print the paths of the images worth labeling next (representative first, then uncertain; classes balanced)."""
    s = open_store(store)
    res = s.suggest(n, head=head)
    if json_:
        emit_json([r.to_dict() for r in res])
        return
    for r in res:
        out.print(f"{r.path}" + (f"\t{r.reason}" if reasons else ""), highlight=False, soft_wrap=True)


@handle_errors
def eval_(
    store: Path = STORE_ARG,
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="Shots per class, comma-separated (as the labels allow)."),
    episodes: int = typer.Option(10, "--episodes", min=1, help="Episodes per shot count."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Heads to compare, comma-separated; default: all that apply."),
    seed: int = typer.Option(0, "--seed", help="Seed of the episode sampling."),
    json_: bool = JSON_OPT,
):
    """Few-shot learning curve of each head from the labels; the run is stored for plateau detection."""
    s = open_store(store)
    head_list = [h.strip() for h in heads.split(",") if h.strip()] if heads else None
    run = s.evaluate(shots=_ints(shots, "--shots"), episodes=episodes, heads=head_list, seed=seed, progress=not json_)
    plat = s.plateau()  # the fine-tune loop's rule over the stored runs, this one included
    if json_:
        emit_json({**run.to_dict(), "plateau": plat.to_dict()})
        return
    from rich.table import Table

    header, rows = run.curve_table()
    t = Table(*header, title=f"accuracy, {run.episodes} episodes, {run.tested_on()}")
    for r in rows:
        t.add_row(*r)
    out.print(t)
    if run.best_head is not None:
        out.print(f"best at {run.best_shots} shots: [bold]{run.best_head}[/] {run.best_accuracy:.3f} (run {run.run_id})", highlight=False)
    out.print(run.estimate_line(), highlight=False)
    for h, e in run.errors.items():
        out.print(f"  [yellow]{h} failed[/]: {e}", highlight=False)
    out.print(f"plateau: [bold]{'yes' if plat.plateau else 'no'}[/] ({plat.reason})", highlight=False)


@handle_errors
def export(
    store: Path = STORE_ARG,
    dest: Path = typer.Argument(..., help="Output file (csv, json) or folder (imagefolder).", show_default=False),
    fmt: str = typer.Option("csv", "--format", "-f", help="csv, json or imagefolder."),
    include: str = typer.Option("all", "--include", help="all, labels or predictions."),
    link: bool = typer.Option(False, "--link", help="imagefolder: symlink instead of copying."),
    overwrite: bool = typer.Option(False, "--overwrite", help="imagefolder: write into a non-empty folder."),
    json_: bool = JSON_OPT,
):
    """Export labels and predictions as CSV, JSON or an ImageFolder tree (DEST/<class>/<file>)."""
    s = open_store(store)
    res = s.export(fmt, dest, include=include, link=link, overwrite=overwrite)
    if json_:
        emit_json(res.to_dict())
        return
    out.print(
        f"exported [bold]{res.rows}[/] rows to {res.out} ({fmt})"
        + (f", {res.files} files" if res.files is not None else "")
        + (f", {res.unknown} unknown" if res.unknown else ""),
        highlight=False,
    )
    for m in (res.missing or [])[:10]:
        out.print(f"  [yellow]missing[/] {m}", highlight=False)


def register(app: typer.Typer) -> None:
    for fn in (label, unlabel, labels, classify, suggest):
        app.command()(fn)
    app.command("eval")(eval_)
    app.command()(export)
