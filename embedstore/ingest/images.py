"""Image files: finding them in folders, opening them as RGB, refusing decompression bombs.

Depends only on Pillow (not on the pipeline or the backbones), so both can import it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Protocol, Sequence

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
    im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    check_pixel_limit(im)
    if pre is not None and im.format == "JPEG":
        target = pre.resize_size
        im.draft("RGB", (target, target))  # decode at 1/2, 1/4, 1/8 scale when the file is large
    im.load()
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def list_image_files(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Expand files and folders (recursively) into absolute image paths; also return missing paths.

    Files named explicitly are always tried (a bad one is recorded as an error); inside folders only
    files with image extensions are taken.
    """
    files: list[str] = []
    missing: list[str] = []
    for p in paths:
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
