"""search, index, duplicates."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import JSON_OPT, STORE_ARG, emit_json, handle_errors, open_store, out


@handle_errors
def search(
    store: Path = STORE_ARG,
    image: Optional[Path] = typer.Option(None, "--image", help="Query image file (embedded with the store's backbone).", show_default=False),
    text: Optional[str] = typer.Option(None, "--text", help="Text query (open_clip backbones only).", show_default=False),
    id_: Optional[int] = typer.Option(None, "--id", help="Id of a stored image to use as the query (left out of its results).", show_default=False),
    k: str = typer.Option("20", "-k", "--k", help="Number of results (at most the images in the store)."),
    where: Optional[str] = typer.Option(
        None, "--where", help="SQL filter, e.g. \"label = 'defect'\", \"prediction IS NULL\", \"path LIKE '%/2024/%'\".",
        show_default=False,
    ),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="New place of the store's weights file, if it was moved (its digest must match).",
        show_default=False,
    ),
    json_: bool = JSON_OPT,
):
    """Find the k images most similar to an image, a text or a stored image."""
    s = open_store(store, weights=str(weights) if weights is not None else None)
    hits = s.search(image=str(image) if image is not None else None, text=text, id=id_, k=k, where=where)
    if json_:
        emit_json([{"id": h.id, "path": h.path, "score": h.score} for h in hits])  # the CLI's shape since 0.1
        return
    from rich.table import Table

    extra = [c for c in ("label", "prediction") if any(getattr(h, c) is not None for h in hits)]
    t = Table("score", "id", "path", *extra)
    for h in hits:
        t.add_row(f"{h.score:.4f}", str(h.id), h.path, *[str(getattr(h, c) or "") for c in extra])
    out.print(t)
    if not hits:
        out.print("no results" + (" (no image matches --where)" if where else ""))


@handle_errors
def index(
    store: Path = STORE_ARG,
    factory: Optional[str] = typer.Option(
        None, "--factory", help="FAISS factory string, e.g. 'Flat', 'HNSW32,Flat', 'IVF1024,Flat'; default: chosen by size.",
        show_default=False,
    ),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="Build and search on the GPU (default: when FAISS sees one).", show_default=False),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Build batch by batch from the table, never holding all vectors (IVF-SQ8 unless --factory); default: when the vectors take 4 GiB or more.", show_default=False),
    json_: bool = JSON_OPT,
):
    """(Re)build the similarity index of STORE now (searches build and update it automatically)."""
    s = open_store(store)
    res = s.build_index(factory=factory, gpu=gpu, progress=not json_, stream=stream)
    if json_:
        emit_json(res.to_dict())
        return
    if res.recall_at_10 is not None:
        rec = f", recall@10 {res.recall_at_10:.3f} at {res.params}"
    else:
        rec = " (exact)" if res.kind == "flat" else f" at {res.params} (too few vectors to measure recall)"
    secs = sum((res.seconds or {}).values())
    out.print(
        f"indexed [bold]{res.vectors}[/] vectors with {res.factory}{rec} in {secs:.1f}s"
        + (" on the GPU" if res.gpu else "") + (" (streamed from the table)" if res.streamed else ""),
        highlight=False,
    )


@handle_errors
def duplicates(
    store: Path = STORE_ARG,
    threshold: float = typer.Option(0.95, "--threshold", help="Cosine similarity at or above which two images count as near-duplicates."),
    json_: bool = JSON_OPT,
):
    """List pairs of near-duplicate images (most similar first)."""
    s = open_store(store)
    pairs = s.duplicates(threshold=threshold)
    if json_:
        emit_json([p.to_dict() for p in pairs])
        return
    from rich.table import Table

    t = Table("score", "id", "path", "id", "path")
    for p in pairs:
        t.add_row(f"{p.score:.4f}", str(p.id_a), p.path_a, str(p.id_b), p.path_b)
    out.print(t)
    out.print(f"{len(pairs)} pair(s) at similarity >= {threshold}")


def register(app: typer.Typer) -> None:
    for fn in (search, index, duplicates):
        app.command()(fn)
