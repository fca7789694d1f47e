"""add, remove, info, backbones, demo."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedstore.errors import InvalidArgumentError

from .common import JSON_OPT, STORE_ARG, emit_json, handle_errors, open_store, out, parse_ints


@handle_errors
def add(
    store: Path = STORE_ARG,
    paths: List[str] = typer.Argument(..., help="Image files or folders (searched recursively), or object-storage URIs (s3://bucket/prefix/).", show_default=False),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Backbone for a new store (see `embedstore backbones`); default offline:efficientnet_lite0."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local checkpoint file to load into the backbone (no download); for an existing store, the new place of its weights file if it was moved."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per forward pass; default: automatic."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decode worker processes (--engine ray: embedding actors); default: automatic."),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help="Decode JPEGs on the GPU (nvJPEG); workers only read files."),
    tables: Optional[str] = typer.Option(None, "--tables", help="For a new store: keep its LanceDB tables on object storage (s3://BUCKET/PREFIX); STORE keeps the manifest, lock and index."),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray (a Ray cluster: Ray Data tasks decode, an actor pool embeds)."),
    address: Optional[str] = typer.Option(None, "--address", help="--engine ray: the cluster (auto = the running one, ray://HOST:10001); default: a local Ray."),
    num_gpus_per_worker: float = typer.Option(0.0, "--num-gpus-per-worker", min=0, help="--engine ray: GPUs per embedding actor (1 = one model per GPU)."),
    json_: bool = JSON_OPT,
):
    """Add images to STORE (creating it): new content is embedded, duplicates skipped, a killed run resumes."""
    s = open_store(store, create=True, backbone=backbone, weights=str(weights) if weights else None, device=device,
                   tables=tables)
    res = s.add(
        paths, batch_size=batch_size, workers=workers, progress=not json_, gpu_decode=gpu_decode, engine=engine,
        address=address, num_gpus_per_worker=num_gpus_per_worker,
    )
    if json_:
        emit_json(res.to_dict())
        return
    out.print(
        f"added [bold]{res.added}[/] images ({res.images_per_second:.1f} img/s on {res.device}), "
        f"skipped {res.skipped_duplicates} duplicates"
        + (f", resumed {res.resumed}" if res.resumed else "")
        + (f", replaced {res.replaced}" if res.replaced else "")
        + (f", [yellow]{res.errors} errors[/]" if res.errors else "")
        + f" in {res.seconds:.1f}s"
    )
    for e in res.error_list[:10]:
        out.print(f"  [yellow]skipped[/] {e.path}: {e.error}", highlight=False)
    for m in res.missing_paths:
        out.print(f"  [yellow]not found[/] {m}", highlight=False)
    if res.labels_dropped:
        out.print(f"[yellow]warning:[/] {len(res.labels_dropped)} label(s) dropped: these files changed on disk "
                  "(same path, new bytes), so they are new images; label them again", highlight=False)
        for p in res.labels_dropped[:20]:
            out.print(f"  [yellow]label dropped[/] {p}", highlight=False)


@handle_errors
def remove(
    store: Path = STORE_ARG,
    items: Optional[List[str]] = typer.Argument(None, help="Image paths or folders (as added); ids go in --ids.", show_default=False),
    ids: Optional[str] = typer.Option(None, "--ids", help="Image ids, comma-separated (instead of / besides paths)."),
    json_: bool = JSON_OPT,
):
    """Remove images from STORE: their vectors (every version), labels and predictions. Files on disk stay."""
    targets = list(items or []) + (parse_ints(ids, "--ids") or [])
    if not targets:
        raise InvalidArgumentError("nothing to remove; pass image paths, folders or --ids 1,2")
    res = open_store(store).remove(targets)
    if res.removed == 0 and res.unknown:
        raise InvalidArgumentError(
            f"none of the {len(res.unknown)} item(s) is in the store (first: {res.unknown[0]}); nothing removed. "
            "Check the paths (as added) or the ids (`embedstore search STORE ... --json` shows them)"
        )
    if json_:
        emit_json(res.to_dict())
        return
    out.print(f"removed [bold]{res.removed}[/] images (vectors, labels, predictions); the files on disk are untouched",
              highlight=False)
    if res.unknown:
        out.print(f"[yellow]{res.unknown_count} not in the store[/] (nothing removed for them):", highlight=False)
        for u in res.unknown[:20]:
            out.print(f"  [yellow]unknown[/] {u}", highlight=False)


@handle_errors
def info(store: Path = STORE_ARG, json_: bool = JSON_OPT):
    """Show counts, backbone and version of STORE."""
    s = open_store(store)
    d = s.info().to_dict()
    if json_:
        d["error_list"] = [e.to_dict() for e in s.errors()]
        emit_json(d)
        return
    for k, v in d.items():
        out.print(f"[bold]{k:>12}[/]  {v}", highlight=False)


@handle_errors
def backbones(json_: bool = JSON_OPT):
    """List known backbone names (any timm model or open_clip pair works too)."""
    from embedstore.ingest.backbones import DEFAULT_BACKBONE, KNOWN_BACKBONES  # the registry listing

    if json_:
        emit_json([{"name": k, "description": v, "default": k == DEFAULT_BACKBONE} for k, v in KNOWN_BACKBONES.items()])
        return
    from rich.table import Table

    t = Table("name", "description")
    for k, v in KNOWN_BACKBONES.items():
        t.add_row(k + (" (default)" if k == DEFAULT_BACKBONE else ""), v)
    out.print(t)
    out.print("Also: any timm:MODEL[.TAG], any openclip:ARCH/PRETRAINED, and --weights FILE for a local checkpoint.")


@handle_errors
def demo(
    store: Path = typer.Argument(Path("demo.es"), help="Where to build the demo store."),
    force: bool = typer.Option(False, "--force", help="Rebuild the demo store even if it holds labels or evals added since."),
    json_: bool = JSON_OPT,
):
    """Offline, CPU, about a minute: build a store from sample photos and show what it can do."""
    from embedstore.demo import run_demo  # a script over the public API, not part of the Store

    report = run_demo(store, progress=not json_, say=(lambda m: None) if json_ else out.print, force=force)
    if json_:
        emit_json(report)


def register(app: typer.Typer) -> None:
    for fn in (add, remove, info, backbones, demo):
        app.command()(fn)
