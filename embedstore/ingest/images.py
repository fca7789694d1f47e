"""Image files: finding them in folders, opening them as RGB, refusing decompression bombs.

Depends only on Pillow and sources.py (not on the pipeline or the backbones), so both can import it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps

from embedstore.ingest.sources import is_uri, list_uri, read_bytes

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# What opening a bad file raises (besides Image.DecompressionBombError, which is none of these).
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)

# Pillow warns (stderr, two lines) when an image is over its pixel limit; check_pixel_limit refuses such
# images before decoding with an error that says so, so the warning is only noise in front of it.
_QUIET = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def _quiet_bomb_warning() -> None:
    """Install the filter (again: a catch_warnings block that was active at import time drops it on exit)."""
    if _QUIET not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_quiet_bomb_warning()


class DraftTarget(Protocol):
    """What load_image needs from a preprocessing config (backbones.base.PreprocessCfg)."""

    @property
    def resize_size(self) -> int: ...


def check_pixel_limit(im: Image.Image) -> None:
    """Raise DecompressionBombError when an opened (not yet decoded) image exceeds Image.MAX_IMAGE_PIXELS.

    Pillow raises over twice its pixel limit and only warns above it; this refuses both before decoding.
    (An explicit check, not warnings.catch_warnings: that is not thread-safe, and decoding runs in threads.)
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.width * im.height > limit:
        raise Image.DecompressionBombError(
            f"image of {im.width}x{im.height} pixels exceeds the limit of {limit} pixels (possible decompression "
            "bomb); raise PIL.Image.MAX_IMAGE_PIXELS to accept it"
        )


def load_image(src, pre: DraftTarget | None = None) -> Image.Image:
    """Open a path/bytes as RGB: draft-mode decode for JPEGs, EXIF orientation, bomb check.

    Raises on unreadable, truncated, non-image and decompression-bomb files.
    """
    _quiet_bomb_warning()
    if is_uri(src):
        src = read_bytes(src)
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses in open(); same advice as ours
        raise Image.DecompressionBombError(
            f"{str(e).rstrip('.')}; raise PIL.Image.MAX_IMAGE_PIXELS to accept it"
        ) from None
    check_pixel_limit(im)
    if pre is not None and im.format == "JPEG":
        target = pre.resize_size
        im.draft("RGB", (target, target))  # decode at 1/2, 1/4, 1/8 scale when the file is large
    im.load()
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any mode. 16/32-bit integer and float greyscale are scaled to 8 bits first (Pillow's
    convert("RGB") clips them at 255, which turns a 16-bit scan nearly white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or (im.mode == "I" and 255 < top <= 65535 and a.min() >= 0):
            a = a / 257.0  # 16-bit 0..65535 -> 0..255
        elif im.mode == "F" and top <= 1.0 and a.min() >= 0:  # float data in 0..1
            a = a * 255.0
        elif top > 255 or (a.size and a.min() < 0):  # other 32-bit int / float data: stretch the used range
            lo = float(a.min())
            a = (a - lo) * (255.0 / max(top - lo, 1e-12))
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def list_image_files(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursively) and object-storage URIs into image paths; also return missing paths.

    Files named explicitly are always tried (a bad one is recorded as an error); inside folders only
    files with image extensions are taken.
    """
    files: list[str] = []
    missing: list[str] = []
    for p in paths:
        if is_uri(p):  # object storage: s3://bucket/prefix/ (see sources.py)
            found, gone = list_uri(p, IMAGE_EXTENSIONS)
            files += found
            missing += gone
            continue
        p = Path(p).expanduser()
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS and not any(
                    part.startswith(".") for part in q.relative_to(p).parts
                ):
                    files.append(str(q.resolve()))
        elif p.is_file():
            files.append(str(p.resolve()))
        else:
            missing.append(str(p))
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))], missing
