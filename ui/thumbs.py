"""Thumbnails, made once per image into STORE/thumbs/<id>.jpg and reused by every page.

Paths are always looked up by image id (`store.paths_for`): the UI never opens a path that a
user typed, so it can show nothing that is not in the store. Ids are never reused (a replaced file gets a
new id), so a cached thumbnail never goes stale.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps

SIZE = 224  # longest side of a thumbnail, pixels
TINY = 96  # longest side of the hover previews on the map
THUMB_DIR = "thumbs"


def thumb_dir(root: Path) -> Path:
    return Path(root) / THUMB_DIR


def _make(src: str, dst: Path, size: int = SIZE) -> Path | None:
    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size), Image.BICUBIC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            im.save(tmp, "JPEG", quality=85)
            os.replace(tmp, dst)  # atomic: a reader never sees half a file
        return dst
    except (OSError, ValueError, Image.DecompressionBombError):
        return None  # unreadable or moved since it was added: the grid shows a placeholder


def lookup_paths(store, ids: Sequence[int]) -> dict[int, str]:
    """id -> source path for just these ids (ids not in the store are left out)."""
    ids = [int(i) for i in ids]
    if not ids:
        return {}
    return {i: p for i, p in zip(ids, store.paths_for(ids)) if p}


def thumbnails(store, ids: Sequence[int], workers: int = 4) -> dict[int, Path | None]:
    """id -> thumbnail file (None when the image cannot be read); makes the missing ones in parallel."""
    d = thumb_dir(store.root)
    out: dict[int, Path | None] = {}
    missing = []
    for i in ids:
        p = d / f"{int(i)}.jpg"
        if p.is_file():
            out[int(i)] = p
        else:
            missing.append(int(i))
    if missing:
        src = lookup_paths(store, missing)
        jobs = [(i, src[i]) for i in missing if i in src]
        for i in missing:
            out.setdefault(i, None)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs) or 1))) as pool:
            for i, res in zip([j[0] for j in jobs], pool.map(lambda j: _make(j[1], d / f"{j[0]}.jpg"), jobs)):
                out[i] = res
    return out


def data_uri(path: Path | None, size: int = TINY) -> str:
    """A small inline JPEG (for chart tooltips, which cannot fetch files)."""
    if path is None:
        return ""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def cache_size(root: Path) -> tuple[int, int]:
    """(files, bytes) in the thumbnail cache."""
    d = thumb_dir(root)
    if not d.is_dir():
        return 0, 0
    files = [p for p in d.iterdir() if p.suffix == ".jpg"]
    return len(files), sum(p.stat().st_size for p in files)
