"""embedstore: turn an image collection into a searchable, labelable embedding index.

    import embedstore
    store = embedstore.open("./photos.es", backbone="offline:efficientnet_lite0")
    store.add(["./photos"])
    ids, paths, X = store.vectors()

`Store` (store.py) is the one Python API; its methods return the dataclasses of `embedstore.results`.
"""

from embedstore import results
from embedstore.errors import EmbedstoreError
from embedstore.results import AddResult, VectorSet


def __getattr__(name: str):
    """`Store` is imported on first use: a Ray worker that only hashes or decodes files imports
    embedstore.ingest.* without torch, LanceDB and FAISS (seconds per worker process)."""
    if name == "Store":
        from embedstore.store import Store

        return Store
    raise AttributeError(f"module 'embedstore' has no attribute {name!r}")


def open(path, backbone: str | None = None, weights: str | None = None, **kw) -> "Store":  # noqa: A001
    """Open the store at `path`, creating it (with `backbone`, default offline:efficientnet_lite0) if new.

    Keyword arguments: create=True, device="auto", lock_timeout=30.0, tables=None (for a new store: an
    object-storage URI such as "s3://bucket/prefix" where its LanceDB tables live).
    """
    from embedstore.store import Store

    return Store.open(path, backbone, weights, **kw)


__version__ = "0.1.0"
__all__ = ["open", "Store", "AddResult", "VectorSet", "EmbedstoreError", "results", "__version__"]
