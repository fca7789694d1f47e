"""Real sample images that need no network: views of scikit-image's bundled photos, scikit-learn digits.

Used by `embedstore demo`, the tests and the benchmarks. Nothing here is committed as binary data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# photos shipped inside scikit-image's package data (the rest of skimage.data downloads)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "motorcycle_left", "hubble_deep_field", "retina")


def skimage_data_dir() -> Path:
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


def photo(name: str) -> Image.Image:
    d = skimage_data_dir()
    for ext in (".png", ".jpg"):
        if (d / (name + ext)).exists():
            return Image.open(d / (name + ext)).convert("RGB")
    raise FileNotFoundError(f"scikit-image has no bundled photo '{name}'")


def photo_views(
    photo_img: Image.Image, n: int, rng: np.random.Generator, size: int = 256, scale: tuple[float, float] = (0.5, 1.0)
) -> list[Image.Image]:
    """n random views of one photo: crops of `scale` (fraction of the shorter side), flips, small rotations,
    colour jitter. Small scales (e.g. 0.15-0.35) give texture patches: a much harder few-shot set."""
    w, h = photo_img.size
    out = []
    for _ in range(n):
        s = int(min(w, h) * rng.uniform(*scale))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        im = photo_img.crop((x, y, x + s, y + s)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        im = im.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC)
        arr = np.asarray(im).astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def make_photo_views(
    out_dir: str | os.PathLike, per_class: int = 12, classes=PHOTOS, seed: int = 0, size: int = 256, fmt: str = "jpg"
) -> dict[str, str]:
    """Write per_class views of each photo as out_dir/<class>/<class>_NN.<fmt>; returns {path: class}."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    labels = {}
    for c in classes:
        (out_dir / c).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(photo_views(photo(c), per_class, rng, size)):
            p = out_dir / c / f"{c}_{i:03d}.{fmt}"
            im.save(p, quality=90) if fmt == "jpg" else im.save(p)
            labels[str(p.resolve())] = c
    return labels


def make_digits(out_dir: str | os.PathLike, per_class: int = 20, seed: int = 0, size: int = 64) -> dict[str, str]:
    """scikit-learn's 8x8 handwritten digits, upscaled to size x size RGB PNGs in out_dir/<digit>/."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    labels = {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))[:per_class]
        (out_dir / str(c)).mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(idx):
            arr = (255 - d.images[j] * (255 / 16)).astype(np.uint8)
            im = Image.fromarray(arr).resize((size, size), Image.BILINEAR).convert("RGB")
            p = out_dir / str(c) / f"digit{c}_{i:03d}.png"
            im.save(p)
            labels[str(p.resolve())] = str(c)
    return labels
