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


# ---- more collections for benchmarks/fewshot.py: unlike digits and photos, still offline ------------
GLYPHS = tuple("abdeghnpqs")  # similar round lowercase shapes: the font varies more than the letter does
TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "text", "camera", "microaneurysms")
ICON_CLASSES = ("actions", "devices", "emotes", "mimetypes", "places", "status")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
ICON_THEME = "/usr/share/icons/Adwaita/48x48"


def font_files() -> list[Path]:
    """TrueType/OpenType fonts installed on this machine (Debian: fonts-dejavu-core, fonts-liberation, ...)."""
    out = sorted({p for d in FONT_DIRS if Path(d).exists() for ext in ("*.ttf", "*.otf") for p in Path(d).rglob(ext)})
    if not out:
        raise FileNotFoundError("no fonts found; apt-get install -y fonts-dejavu-core fonts-liberation")
    return out


def glyph_images(per_font: int = 1, glyphs=GLYPHS, seed: int = 0, size: int = 96):
    """(images, classes): each glyph drawn in every installed font, at a random size, offset and rotation."""
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    imgs, ys = [], []
    for f in font_files():
        for g in glyphs:
            for _ in range(per_font):
                font = ImageFont.truetype(str(f), int(size * rng.uniform(0.45, 0.7)))
                im = Image.new("L", (size, size), 255)
                draw = ImageDraw.Draw(im)
                l, t, r, b = draw.textbbox((0, 0), g, font=font)
                x = (size - (r - l)) / 2 - l + rng.uniform(-8, 8)
                y = (size - (b - t)) / 2 - t + rng.uniform(-8, 8)
                draw.text((x, y), g, font=font, fill=0)
                im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=255)
                imgs.append(im.convert("RGB"))
                ys.append(g)
    return imgs, ys


def icon_images(per_class: int = 60, classes=ICON_CLASSES, theme: str = ICON_THEME, seed: int = 0, size: int = 96):
    """(images, classes): icons of a Debian icon theme (default Adwaita 48x48, package adwaita-icon-theme),
    classes from its folder names, drawn on white and upscaled; up to per_class per folder (seeded sample)."""
    rng = np.random.default_rng(seed)
    imgs, ys = [], []
    for c in classes:
        files = sorted((Path(theme) / c).glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no icons in {theme}/{c}; apt-get install -y adwaita-icon-theme")
        for j in sorted(rng.permutation(len(files))[:per_class]):
            im = Image.open(files[j]).convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            imgs.append(Image.alpha_composite(bg, im).convert("RGB").resize((size, size), Image.BICUBIC))
            ys.append(c)
    return imgs, ys


def texture_images(per_class: int = 40, classes=TEXTURES, seed: int = 0, size: int = 128, scale=(0.1, 0.25)):
    """(images, classes): grey patches of scikit-image's bundled grey pictures (brick, grass, gravel, ...)."""
    rng = np.random.default_rng(seed)
    imgs, ys = [], []
    for c in classes:
        src = Image.open(skimage_data_dir() / f"{c}.png").convert("L").convert("RGB")
        imgs += [v.convert("L").convert("RGB") for v in photo_views(src, per_class, rng, size, scale=scale)]
        ys += [c] * per_class
    return imgs, ys
