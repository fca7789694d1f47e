"""finetune, versions, use, prune: the fine-tune loop's commands (thin wrappers over the Store's loop methods)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import JSON_OPT, STORE_ARG, emit_json, handle_errors, open_store, out


@handle_errors
def finetune(
    store: Path = STORE_ARG,
    if_plateau: bool = typer.Option(False, "--if-plateau", help="Only fine-tune when the eval history shows a plateau."),
    method: str = typer.Option("last-blocks", "--method", help="last-blocks (L2-SP, default: measured best), lora (adapters) or full (L2-SP)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs to train (a fixed schedule unless a selection fold is asked for); default 16."),
    margin: Optional[float] = typer.Option(None, "--margin", min=0.0, help="Plateau: least accuracy gain that still counts as progress (default 0.01)."),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="Plateau: over how many label additions the gain is measured (default 2)."),
    image_size: Optional[int] = typer.Option(None, "--size", min=32, help="Training resolution; default: the backbone's input size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate; default per method."),
    pseudo: Optional[float] = typer.Option(None, "--pseudo", min=0.0, max=0.999, help="Self-training: unlabeled images auto labels with at least this confidence train too (0: off; default 0.9)."),
    pseudo_rounds: Optional[int] = typer.Option(None, "--pseudo-rounds", min=1, help="Self-training rounds: re-label with the trained backbone, train again (default 1)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Horizontal flips in training; default: decided from the labels (off when mirrored labeled images stop looking like their class)."),
    evaluate: bool = typer.Option(False, "--evaluate", help="Run the few-shot eval on the new version when it is activated."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    json_: bool = JSON_OPT,
):
    """Fine-tune the backbone on the labels; re-embed, re-index, activate the new version only if it is better."""
    s = open_store(store, device=device)
    opts = {k: v for k, v in (("image_size", image_size), ("lr", lr), ("pseudo_threshold", pseudo),
                              ("pseudo_rounds", pseudo_rounds), ("flip", flip)) if v is not None}  # FinetuneConfig options
    res = s.finetune(method=method, epochs=epochs, if_plateau=if_plateau, progress=not json_, margin=margin,
                     window=window, evaluate=evaluate, **opts)
    if json_:
        emit_json(res.to_dict())
        return
    colour = {"activated": "green", "kept": "yellow", "skipped": "cyan", "not-improved": "yellow",
              "too-few-labels": "yellow"}.get(res.status, "white")
    out.print(f"[bold {colour}]{res.status}[/]: {res.message}", highlight=False)
    d, f = res.decision or {}, res.forgetting
    if d.get("old"):
        out.print(f"  decision on {d['n']} labels the new backbone never trained or selected on: best head "
                  f"{d['old']['head']} {d['old']['accuracy']:.3f} -> {d['new']['head']} {d['new']['accuracy']:.3f}; "
                  f"new - old {d['estimate']:+.3f}, 80% interval {d['low']:+.3f} .. {d['high']:+.3f} "
                  f"(paired bootstrap); activates when the lower end > margin {d['margin']:+.3f}", highlight=False)
        if d.get("auto"):
            a = d["auto"]
            out.print(f"  auto (what classify uses) on the same labels: {a['old']:.3f} -> {a['new']:.3f} "
                      f"({a['estimate']:+.3f}); must not be worse", highlight=False)
    if fl := (res.train or {}).get("flip"):
        out.print(f"  augmentation: {fl.get('reason')}", highlight=False)
    if t := (res.train or {}).get("pseudo"):
        if t.get("kept"):
            out.print(f"  self-training: {t['kept']} unlabeled images pseudo-labeled by {t.get('head')} at confidence "
                      f">= {t['threshold']} (of {t['candidates']} candidates) trained with the labels", highlight=False)
    if f:
        out.print(f"  search on {f['n']} unlabeled images: near-duplicate recall@{f['k']} {f['recall_old']:.3f} -> "
                  f"{f['recall_new']:.3f}, top-10 neighbours kept {f['neighbour_overlap']:.0%} "
                  f"(refuses activation when recall drops more than {d.get('max_forgetting')})", highlight=False)
    for w in res.warnings:
        out.print(f"  [yellow]warning[/]: {w}", highlight=False)
    if res.version:
        t = res.train or {}
        out.print(
            f"  re-embedded {res.reembedded} images ({res.vectors} vectors)"
            + (f", trained {t.get('epochs_run')} epochs in {t.get('seconds')}s ({t.get('images_per_second')} img/s)" if t else "")
            + (" (resumed an unfinished run)" if res.resumed else ""),
            highlight=False,
        )


@handle_errors
def versions(store: Path = STORE_ARG, json_: bool = JSON_OPT):
    """List backbone versions: which is active, their parent and eval accuracy."""
    s = open_store(store)
    rows = s.versions()
    if json_:
        emit_json([r.to_dict() for r in rows])
        return
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("version", "", "parent", "method", "status", "vectors", "eval", "held-out"):
        t.add_column(col, no_wrap=True)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        t.add_row(
            r.version, "*" if r.active else "", r.parent or "-", r.method or "-", r.status,
            str(r.vectors), fmt(r.eval_accuracy), fmt(r.holdout_accuracy),
        )
    out.print(t)
    out.print("* = active; eval: latest `embedstore eval` best-head accuracy; held-out: the fine-tune's activation check",
              highlight=False)


@handle_errors
def use(
    store: Path = STORE_ARG,
    version: str = typer.Argument(..., help="Version fingerprint (or a unique prefix) from `embedstore versions`."),
    json_: bool = JSON_OPT,
):
    """Make VERSION the active backbone version (roll back or forward); search and classify follow it."""
    s = open_store(store)
    res = s.use(version, progress=not json_)
    if json_:
        emit_json(res.to_dict())
        return
    out.print(f"active version: [bold]{res.version}[/] (was {res.previous}), {res.vectors} vectors"
              + (f", embedded {res.embedded} new images" if res.embedded else ""), highlight=False)


@handle_errors
def prune(
    store: Path = STORE_ARG,
    version: str = typer.Argument(..., help="An inactive version to delete (vectors, index, weights)."),
    json_: bool = JSON_OPT,
):
    """Delete an inactive backbone version's vectors, index and weights."""
    res = open_store(store).prune(version)
    if json_:
        emit_json(res.to_dict())
        return
    out.print(f"pruned version [bold]{res.pruned}[/] ({len(res.files)} files)", highlight=False)


def register(app: typer.Typer) -> None:
    for fn in (finetune, versions, use, prune):
        app.command()(fn)
