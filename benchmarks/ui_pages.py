"""How long each UI page takes to render on a store of N images (default 100k), cold and warm.

A real store whose LanceDB tables hold N synthetic clustered vectors (written directly, no embedding);
the image paths cycle over 80 real sample photos so thumbnails are really made. 20 labels per class
(store.label) and predictions for every other image (store.classify, centroid head) come first. Each
page is then driven with streamlit's AppTest, as a browser would: the first render (cold caches:
tables, thumbnails, the FAISS index on the first search) and a rerun (what every click costs after).
Prints a table, then one JSON line.

    python benchmarks/ui_pages.py               # 100k images, a few minutes on 2 cores
    python benchmarks/ui_pages.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from classify_newclass import BACKBONE, clustered  # noqa: E402

import embedstore  # noqa: E402
from embedstore.samples import make_photo_views  # noqa: E402
from synthetic_store import write_vectors  # noqa: E402


def make_store(root: Path, X: np.ndarray, photos: list[str]):
    """X as the store's vectors; image j shows photos[j % len(photos)] (real files for the thumbnails)."""
    store = embedstore.open(root, backbone=BACKBONE, device="cpu")
    return write_vectors(store, X, path_of=lambda j: photos[j % len(photos)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()

    from streamlit.testing.v1 import AppTest

    from embedstore.ui import APP_PATH

    tmp = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    make_photo_views(tmp / "photos", per_class=10)
    photos = sorted(str(p) for p in (tmp / "photos").rglob("*.jpg"))
    X, y = clustered(args.n, 1280, args.classes, spread=1.0)
    t0 = time.perf_counter()
    store = make_store(tmp / "bench.es", X, photos)
    for c in range(args.classes):
        store.label([int(i) for i in np.flatnonzero(y == c)[:20]], f"class{c}")
    store.classify(head="centroid")
    setup_s = time.perf_counter() - t0

    os.environ["EMBEDSTORE_STORE"] = str(store.root)
    at = AppTest.from_file(str(APP_PATH), default_timeout=900)
    rows = []

    def measure(name: str, action) -> None:
        t = time.perf_counter()
        action()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        at.run()
        warm = time.perf_counter() - t
        assert not at.exception, [e.value for e in at.exception]
        rows.append({"page": name, "first_s": round(cold, 2), "rerun_s": round(warm, 2)})

    measure("search (browse)", at.run)
    measure("search (similar; first builds the index)", lambda: at.button(key="browse_nb_1").click().run())
    measure("search (similar, next image)", lambda: at.button(key="search_res_nb_" + str(_first_result(at))).click().run())
    for page in ("Label", "Review", "Map", "Store"):
        measure(page.lower(), lambda p=page: at.sidebar.radio(key="nav").set_value(p).run())

    print(f"\nUI pages on {args.n:,} images ({args.classes} classes, {20 * args.classes} labels; setup {setup_s:.0f}s)")
    print(f"{'page':<44}{'first render s':>16}{'rerun s':>10}")
    for r in rows:
        print(f"{r['page']:<44}{r['first_s']:>16.2f}{r['rerun_s']:>10.2f}")
    print(json.dumps({"benchmark": "ui_pages", "n": args.n, "classes": args.classes, "setup_s": round(setup_s, 1),
                      "pages": rows}))


def _first_result(at) -> int:
    for b in at.button:
        if b.key and b.key.startswith("search_res_nb_"):
            return int(b.key.rsplit("_", 1)[1])
    raise AssertionError("no search results")


if __name__ == "__main__":
    main()
