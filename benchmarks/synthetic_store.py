"""Shared by the benchmarks: fill a store with given vectors, written straight into LanceDB (no embedding)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pyarrow as pa

from embedstore.storage import IMAGES_SCHEMA, fixed_list


def write_vectors(store, X: np.ndarray, path_of: Callable[[int], str] = lambda j: f"/synthetic/{j}.jpg",
                  chunk: int = 50_000):
    """Images rows (ids 0..N-1, paths from `path_of`) and their vectors X in the active version's table,
    written through the storage core (`store.storage`)."""
    st = store.storage
    if st.version_info()["dim"] != X.shape[1]:
        raise SystemExit(f"vectors must be {st.version_info()['dim']}-d for {st.version_info()['name']}")
    now = int(time.time() * 1e6)
    with st.write_lock():
        images, vt = st.table("images", create=True), st.vectors_table(create=True)
        for i in range(0, len(X), chunk):
            ids = np.arange(i, min(i + chunk, len(X)), dtype=np.int64)
            images.add(pa.table({
                "id": ids, "path": pa.array([path_of(int(j)) for j in ids]), "hash": pa.array([f"h{j}" for j in ids]),
                "size": pa.array(np.zeros(len(ids), np.int64)),
                "added": pa.array(np.full(len(ids), now), pa.timestamp("us", tz="UTC")),
            }, schema=IMAGES_SCHEMA))
            vt.add(pa.table({"id": ids, "vector": fixed_list(X[ids])}))
        st.manifest["next_id"] = len(X)
        st.write_manifest()
    return store
