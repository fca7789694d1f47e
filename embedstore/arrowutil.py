"""Small helpers over Arrow and LanceDB filters, shared by the storage core and the services (re-exported by
storage.py, which is where callers import them from)."""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

CHUNK = 2000  # ids per `id IN (...)` filter


def content_hash(path: str | os.PathLike) -> str:
    """blake2b-160 of a file's bytes: the identity of an image's content (dedup, label survival)."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_hash(data: bytes) -> str:
    """The same hash as content_hash, of bytes already read (read once: hash what is decoded)."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def id_in(ids: Iterable[int]) -> str:
    """A LanceDB filter selecting the given image ids."""
    return f"id IN ({', '.join(str(int(i)) for i in ids)})"


def chunks(seq: Sequence, n: int = CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def fixed_list(vecs: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> the Arrow column type of a vectors table."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])


def to_matrix(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A vectors column -> (N, D) float32."""
    if len(col) == 0:
        return np.zeros((0, dim), np.float32)
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.ascontiguousarray(arr.values.to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)
