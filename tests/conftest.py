"""Shared fixtures: real images (scikit-image photo views, scikit-learn digits) and real stores built once.

Stores are built with the packaged EfficientNet-Lite0 weights (offline:efficientnet_lite0). Tests that
change a store take `store_copy` (a fresh copy of the session store), never the shared one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import embedstore
from embedstore.samples import make_digits, make_photo_views

# a small open_clip model with seeded random weights: only shapes and the text path matter
TINY_CLIP = "openclip:ViT-B-32/random"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core runner, OpenMP threads spinning against other
    processes made model runs ~9x slower (measured); results do not depend on the thread count.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    make_photo_views(d, per_class=10, seed=0)
    return d


@pytest.fixture(scope="session")
def photo_labels(photo_dir) -> dict[str, str]:
    return {str(p.resolve()): p.parent.name for p in sorted(photo_dir.rglob("*.jpg"))}


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("digits")
    make_digits(d, per_class=20, seed=0)
    return d


@pytest.fixture(scope="session")
def photo_store_path(tmp_path_factory, photo_dir) -> Path:
    """A store of the photo views (80 images, 8 classes), built once per session. Treat as read-only."""
    p = tmp_path_factory.mktemp("stores") / "photos.es"
    embedstore.open(p).add([photo_dir], progress=False)
    return p


@pytest.fixture(scope="session")
def digits_store_path(tmp_path_factory, digits_dir) -> Path:
    """A store of 200 digit images (10 classes), built once per session. Treat as read-only."""
    p = tmp_path_factory.mktemp("stores") / "digits.es"
    embedstore.open(p).add([digits_dir], progress=False)
    return p


@pytest.fixture()
def photo_store(photo_store_path, tmp_path):
    """A private, writable copy of the photo store."""
    dst = tmp_path / "photos.es"
    shutil.copytree(photo_store_path, dst)
    return embedstore.open(dst, create=False)


@pytest.fixture()
def digits_store(digits_store_path, tmp_path):
    dst = tmp_path / "digits.es"
    shutil.copytree(digits_store_path, dst)
    return embedstore.open(dst, create=False)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """A seeded random-weight timm `test_efficientnet` checkpoint: a backbone that costs almost nothing to run
    (crash-point and concurrency tests, where only the store's behaviour matters)."""
    import timm
    import torch

    p = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), p)
    return p
