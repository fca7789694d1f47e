"""What every page shares: the cached store, cached reads, the paged thumbnail grid, safe writes.

Caching: the Store (with its loaded backbone and FAISS index) is a `st.cache_resource`, one per process.
Reads (ids, labels, classes, predictions) are `st.cache_data` keyed on `store.data_versions()`, so a rerun
reads nothing from disk unless the data changed (a write by this UI or by the CLI bumps a data version
and the next rerun sees it). Results of the Store are read by attribute (embedstore/results.py).
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import streamlit as st

import embedstore
from embedstore.errors import EmbedstoreError, StoreLockedError

from . import thumbs

UNKNOWN = "(unknown)"  # the bucket of images the heads abstained on
NEW_CLASS = "+ new class…"
WRITE_WAIT_S = 60.0  # how long a UI write waits for another process (a CLI add, ...) to release the store


# ---- the store ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Opening store…")
def open_store(path: str):
    return embedstore.open(path, create=False, lock_timeout=10.0)


@st.cache_resource
def _write_mutex(root: str) -> threading.Lock:
    # Streamlit serves every browser tab from threads of one process sharing one Store object; the
    # store's file lock is re-entrant per object, so writes from two tabs are serialised here first.
    return threading.Lock()


@contextmanager
def writing(store):
    with _write_mutex(str(store.root)):
        yield


def _holder(e: StoreLockedError) -> str:
    m = re.search(r"\(pid ([^)]*)\)", str(e))
    return m.group(1) if m else "?"


@contextmanager
def write_access(store, wait: float | None = None, notify: Callable[[str], None] | None = None):
    """The store's write lock, for one UI write. While another process holds it, say so at once (`notify`,
    default: an info line in the page, which Streamlit sends to the browser as it is drawn) and wait up to
    `wait` s (WRITE_WAIT_S); then StoreLockedError saying nothing was saved. A wait is recorded for
    waited_note()."""
    wait = WRITE_WAIT_S if wait is None else wait
    with writing(store), ExitStack() as held:
        try:
            held.enter_context(store.write_lock(timeout=0))
        except StoreLockedError as e:
            pid = _holder(e)
            note = None
            if notify is None:
                note = st.empty()
                notify = note.info
            notify(f"waiting for another process writing the store (pid {pid})…")
            t0 = time.monotonic()
            try:
                held.enter_context(store.write_lock(timeout=wait))
            except StoreLockedError:
                raise StoreLockedError(
                    f"gave up after {wait:g} s waiting for another process writing the store (pid {pid}); nothing "
                    "was saved: try again when it has finished"
                ) from None
            finally:
                if note is not None:
                    note.empty()
            waited = time.monotonic() - t0
            st.session_state["write_waited"] = f"after waiting {waited:.0f} s for pid {pid} to finish writing"
        yield


def waited_note() -> str:
    """" (after waiting N s for pid P to finish writing)" once after a write that had to wait, else ""."""
    note = st.session_state.pop("write_waited", None)
    return f" ({note})" if note else ""


def run_write(store, fn: Callable, *args, **kw):
    """Run a store write (waiting, with a message, while another process writes); a library error is shown
    as one line instead of a traceback. None on error."""
    try:
        with write_access(store):
            return fn(*args, **kw)
    except EmbedstoreError as e:
        st.error(str(e))
        return None


def call(store, method: str, *args, default=None, **kw):
    """Call a store API method; an EmbedstoreError (e.g. 'no labels yet') becomes an info line."""
    try:
        return getattr(store, method)(*args, **kw)
    except EmbedstoreError as e:
        st.info(str(e))
        return default


# ---- cached reads (keyed on store.data_versions()) ---------------------------------------------
def data_versions(store) -> dict:
    """{"version", "vectors", "labels", "predictions", "images"}: the active version and the data versions
    of what it holds; any write bumps one, so they are the cache keys of every read below."""
    return store.data_versions()


def data_key(store, *parts: str) -> tuple:
    """The cache key of a read that depends on `parts` (e.g. "labels", "predictions")."""
    dv = data_versions(store)
    return tuple((p, dv.get(p)) for p in parts)


def embeddings_key(store) -> tuple:
    """The cache key of anything computed from the active version's vectors."""
    return data_key(store, "version", "vectors")


@st.cache_data(max_entries=8, show_spinner=False)
def _ids(root: str, key: tuple, _store) -> np.ndarray:
    return _store.vector_ids()


def image_ids(store) -> np.ndarray:
    """Sorted ids of every image with a vector in the active version (cached: 8 bytes an image)."""
    return _ids(str(store.root), embeddings_key(store), store)


@st.cache_data(max_entries=8, show_spinner=False)
def _labels(root: str, key: tuple, _store) -> dict[int, str]:
    return {int(k): v for k, v in (_store.labels(source=None) or {}).items()}


def labels(store) -> dict[int, str]:
    """id -> label, of every source (human, model)."""
    return _labels(str(store.root), data_key(store, "labels"), store)


@st.cache_data(max_entries=8, show_spinner=False)
def _classes(root: str, key: tuple, _store) -> list[str]:
    return list(_store.classes())


def classes(store) -> list[str]:
    return _classes(str(store.root), data_key(store, "labels", "predictions"), store)


@st.cache_data(max_entries=8, show_spinner=False)
def _class_counts(root: str, key: tuple, _store) -> dict[str, int]:
    return dict(_store.class_counts())


def class_counts(store) -> dict[str, int]:
    """class -> number of labeled images."""
    return _class_counts(str(store.root), data_key(store, "labels"), store)


@st.cache_data(max_entries=8, show_spinner=False)
def _predictions(root: str, key: tuple, _store) -> pd.DataFrame:
    t = _store.predictions()
    if t is None or t.num_rows == 0:
        return pd.DataFrame(columns=["id", "label", "confidence", "head"])
    df = t.to_pandas()
    return df.drop_duplicates("id", keep="last").set_index("id", drop=False)


def predictions(store) -> pd.DataFrame:
    """One row per image: id (also the index), label (None = abstained), confidence, head."""
    return _predictions(str(store.root), data_key(store, "predictions"), store)


def annotate(store, ids: Sequence[int]) -> tuple[list, list]:
    """(labels, predicted labels) for these ids, from the cached reads; None where there is none."""
    lab = labels(store)
    return [lab.get(int(i)) for i in ids], _lookup(predictions(store), "label", ids)


def confidences(store, ids: Sequence[int]) -> list:
    return _lookup(predictions(store), "confidence", ids)


def _lookup(df: pd.DataFrame, column: str, ids: Sequence[int]) -> list:
    if len(df) == 0:
        return [None] * len(ids)
    vals = df[column].reindex(np.asarray(ids, dtype=np.int64))  # a vectorised lookup, not a dict of 100k rows
    return [None if pd.isna(v) else v for v in vals.tolist()]


def describe(label, prediction, confidence=None) -> str:
    if label:
        return f"✓ {label}"
    if prediction:
        return f"≈ {prediction}" + (f" ({confidence:.2f})" if confidence is not None else "")
    return ""


# ---- navigation -----------------------------------------------------------------------------------
def show_neighbours(id_: int) -> None:
    """Button callback: open the Search page on this image's neighbours."""
    st.session_state["nav"] = "Search"
    st.session_state["search_query"] = {"id": int(id_)}


# ---- widgets ----------------------------------------------------------------------------------------
def pager(n: int, key: str, per_page: int) -> slice:
    pages = max(1, -(-n // per_page))
    if pages == 1:
        return slice(0, n)
    c1, c2 = st.columns([1, 4])
    page = c1.number_input("page", 1, pages, 1, key=f"{key}_page", label_visibility="collapsed")
    lo = (int(page) - 1) * per_page
    c2.caption(f"page {page} of {pages} · images {lo + 1}–{min(n, lo + per_page)} of {n:,}")
    return slice(lo, min(n, lo + per_page))


def selected_ids(key: str, ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids if st.session_state.get(f"{key}_sel_{int(i)}")]


def _set_all(key: str, ids: list[int], value: bool) -> None:
    for i in ids:
        st.session_state[f"{key}_sel_{i}"] = value


def select_buttons(key: str, ids: Sequence[int]) -> None:
    c1, c2, _ = st.columns([1, 1, 4])
    ids = [int(i) for i in ids]
    c1.button("Select all", key=f"{key}_all", on_click=_set_all, args=(key, ids, True))
    c2.button("Clear", key=f"{key}_none", on_click=_set_all, args=(key, ids, False))


def grid(
    store,
    items: Sequence[dict],
    key: str,
    *,
    cols: int = 6,
    selectable: bool = False,
    neighbours: bool = True,
    extra: tuple[str, Callable[[int], None], str] | None = None,
) -> None:
    """Thumbnails with captions; per tile an optional checkbox, a neighbours button and one extra button
    (extra = (icon label, callback(id), tooltip)).

    items: dicts with "id" and "caption".
    """
    if not items:
        st.caption("nothing to show")
        return
    files = thumbs.thumbnails(store, [it["id"] for it in items])
    for row in range(0, len(items), cols):
        columns = st.columns(cols)
        for col, it in zip(columns, items[row : row + cols]):
            i = int(it["id"])
            with col:
                path = files.get(i)
                if path is not None:
                    st.image(str(path), caption=it.get("caption") or f"#{i}", width="stretch")
                else:
                    st.warning(f"#{i}: image unreadable")
                widths = ([1] if selectable else []) + ([1] if neighbours else []) + ([1] if extra else [])
                slots = iter(st.columns(widths, gap="small", vertical_alignment="center")) if widths else iter(())
                if selectable:
                    next(slots).checkbox("select", key=f"{key}_sel_{i}", label_visibility="collapsed")
                if neighbours:
                    next(slots).button(":material/image_search:", key=f"{key}_nb_{i}", on_click=show_neighbours,
                                       args=(i,), help="similar: show this image's nearest neighbours")
                if extra:
                    next(slots).button(extra[0], key=f"{key}_x_{i}", on_click=extra[1], args=(i,), help=extra[2])


def class_picker(store, key: str, label: str = "class") -> str | None:
    """Pick an existing class or type a new one; None until something is chosen."""
    opts = classes(store) + [NEW_CLASS]
    choice = st.selectbox(label, opts, key=f"{key}_cls", index=None if len(opts) > 1 else 0,
                          placeholder="choose a class")
    if choice == NEW_CLASS:
        name = st.text_input("new class name", key=f"{key}_newcls").strip()
        return name or None
    return choice


def refresh_predictions(store) -> str:
    """Re-run the few-shot heads over the store (no retraining step: heads fit in seconds). Returns "" or,
    when they could not run, the one-line reason (also shown), for a caller that reruns the page to keep."""
    if len(set(labels(store).values())) < 2:  # the heads need two classes
        return ""
    with st.spinner("updating predictions…"):
        try:
            with write_access(store):
                res = store.classify()
                st.session_state["classify_reason"] = (res.chosen, res.reason)  # which head predicts, and why
        except EmbedstoreError as e:
            st.info(f"predictions not updated: {e}")
            return f"predictions not updated: {e}"
    return ""
