"""Search: by uploaded image, by text (CLIP backbones), or by any image in the store ("similar").

Without a query the page browses the store, paged. Filters (label / prediction) apply to both.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image, ImageOps

from embedstore.errors import EmbedstoreError

from . import common

PREVIEW = 320  # pixels, the longer side of the query preview


def _on_upload() -> None:
    f = st.session_state.get("search_upload")
    if f is not None:
        data = f.getvalue()
        name = Path(f.name).name or "upload"  # a file name only, never a client path
        st.session_state["search_query"] = {"image": data, "name": name, "sha": hashlib.sha1(data).hexdigest()}
    elif "image" in (st.session_state.get("search_query") or {}):
        st.session_state.pop("search_query")  # the upload was removed: so is its query


def _on_text() -> None:
    text = (st.session_state.get("search_text") or "").strip()
    if text:
        st.session_state["search_query"] = {"text": text}


def _clear() -> None:
    st.session_state.pop("search_query", None)
    st.session_state["search_text"] = ""


def _filters(store, c1, c2) -> tuple[set, set]:
    classes = common.classes(store)
    if not classes:
        return set(), set()
    lab = c1.multiselect("label is", classes + [common.UNKNOWN], key="search_f_label",
                         help=f"{common.UNKNOWN}: images with no label")
    pred = c2.multiselect("prediction is", classes + [common.UNKNOWN], key="search_f_pred",
                          help=f"{common.UNKNOWN}: no prediction, or the heads abstained")
    return set(lab), set(pred)


def _keep(label, prediction, f_lab: set, f_pred: set) -> bool:
    if f_lab and (label or common.UNKNOWN) not in f_lab:
        return False
    if f_pred and (prediction or common.UNKNOWN) not in f_pred:
        return False
    return True


@st.cache_data(max_entries=8, show_spinner=False)
def _preview(sha: str, _data: bytes) -> bytes:
    """A small PNG of an upload the search already read (so not a decompression bomb); 16-bit grey scaled
    to 8 bits for display."""
    im = Image.open(io.BytesIO(_data))
    im.draft("RGB", (PREVIEW, PREVIEW))
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
    im.thumbnail((PREVIEW, PREVIEW))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _query_view(store, q: dict) -> None:
    """Show what the search is for, next to the results."""
    if "id" in q:
        f = common.thumbs.thumbnails(store, [q["id"]]).get(q["id"])
        if f is not None:
            st.image(str(f), caption=f"query: image #{q['id']}", width=160)
    elif "image" in q:
        try:
            st.image(_preview(q["sha"], q["image"]), caption=f"query: {q['name']}", width=160)
        except (OSError, ValueError, SyntaxError):  # the search used it; only the preview failed
            st.caption(f"query: {q['name']}")
    else:
        st.markdown(f"query: **“{q['text']}”**")


def _sql_str(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _sql_in(column: str, values: set) -> str:
    """`column IN (...)`, with the unknown bucket as IS NULL (values are class names from the store)."""
    named = [_sql_str(v) for v in sorted(values) if v != common.UNKNOWN]
    parts = []
    if named:
        parts.append(f"{column} IN ({', '.join(named)})")
    if common.UNKNOWN in values:
        parts.append(f"{column} IS NULL")
    return "(" + " OR ".join(parts) + ")"


def where_clause(f_lab: set, f_pred: set) -> str | None:
    """The label/prediction filters as store.search's `where` (SQL over images + labels + predictions)."""
    parts = [_sql_in(c, v) for c, v in (("label", f_lab), ("prediction", f_pred)) if v]
    return " AND ".join(parts) or None


def _search_upload(store, q: dict, **kw) -> list:
    """Search by an uploaded file, read by the library as `search --image FILE` reads it (same checks: not
    an image, truncated, decompression bomb). Errors name the upload, never the temporary file."""
    name = q["name"]
    safe = re.sub(r"[^\w.-]", "_", name)[-100:].lstrip(".") or "upload"
    with tempfile.TemporaryDirectory(prefix="embedstore-upload-") as d:
        path = Path(d) / safe
        path.write_bytes(q["image"])
        try:
            return store.search(image=str(path), **kw)
        except EmbedstoreError as e:
            raise EmbedstoreError(_scrub(str(e), d, safe, name)) from None
        except Image.DecompressionBombError as e:  # Pillow's own, should the library let it through
            raise EmbedstoreError(f"cannot use {name} as a query: {_scrub(str(e), d, safe, name)}; "
                                  "upload a smaller image") from None


def _scrub(msg: str, tmp: str, safe: str, name: str) -> str:
    """The message on one line, the temporary file's path replaced by the upload's name."""
    for d in {tmp, str(Path(tmp).resolve())}:
        msg = msg.replace(f"{d}/{safe}", name).replace(d, "")
    return " ".join(msg.split())


@st.cache_data(max_entries=32, show_spinner=False)
def _run_search(root: str, vkey: tuple, tkey: tuple, qkey: tuple, k: int, where: str | None, _store, _q: dict) -> list:
    kw = {"k": k, "where": where}
    if "image" in _q:
        return _search_upload(_store, _q, **kw)
    if "text" in _q:
        kw["text"] = _q["text"]
    else:
        kw["id"] = _q["id"]
    return _store.search(**kw)  # list[Hit]


def _results(store, q: dict, k: int, f_lab: set, f_pred: set) -> bool:
    """The result grid; False (with a one-line error) when the search failed."""
    qkey = tuple(sorted((a, b) for a, b in q.items() if a != "image"))
    tkey = common.data_key(store, "labels", "predictions")
    try:
        with st.spinner("searching…"):
            hits = _run_search(str(store.root), common.embeddings_key(store), tkey, qkey, k, where_clause(f_lab, f_pred),
                               store, q)
    except EmbedstoreError as e:
        st.error(str(e))
        return False
    conf = common.confidences(store, [h.id for h in hits])
    shown = [{"id": h.id, "caption": f"{h.score:.3f} · #{h.id} " + common.describe(h.label, h.prediction, c)}
             for h, c in zip(hits, conf)]
    what = "other images nearest to it" if "id" in q else "nearest images"
    st.caption(f"{len(shown)} {what} (cosine similarity)" + (" matching the filters" if f_lab or f_pred else ""))
    common.grid(store, shown, "search_res")
    return True


def _browse(store, f_lab: set, f_pred: set, per_page: int) -> None:
    ids = common.image_ids(store)
    if f_lab or f_pred:
        lab, pred = common.annotate(store, ids)
        ids = [i for i, l, p in zip(ids, lab, pred) if _keep(l, p, f_lab, f_pred)]
    if len(ids) == 0:
        st.info("no images match" if (f_lab or f_pred) else "the store has no images yet: embedstore add STORE FOLDER")
        return
    sl = common.pager(len(ids), "browse", per_page)
    page = [int(i) for i in ids[sl]]
    lab, pred = common.annotate(store, page)
    items = [{"id": i, "caption": f"#{i} {common.describe(l, p)}"} for i, l, p in zip(page, lab, pred)]
    common.grid(store, items, "browse")


def render(store) -> None:
    st.header("Search")
    c1, c2 = st.columns([1, 1])
    c1.file_uploader("search by image", type=["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"],
                     key="search_upload", on_change=_on_upload)
    if store.has_text:
        c2.text_input("search by text", key="search_text", on_change=_on_text,
                      placeholder="a photo of a cat", help="needs a CLIP backbone (it has one)")
    else:
        c2.caption(f"text search needs a CLIP backbone; this store uses {store.version_info()['name']}")
    c0, c1, c2 = st.columns(3)
    k = c0.slider("results", 6, 120, 24, step=6, key="search_k")
    f_lab, f_pred = _filters(store, c1, c2)
    q = st.session_state.get("search_query")
    if not q:
        st.caption("upload an image, type a text, or press :material/image_search: under any image for its neighbours")
        _browse(store, f_lab, f_pred, k)
        return
    c1, c2 = st.columns([1, 5])
    c1.button("clear query", key="search_clear", on_click=_clear)  # first: whatever fails below, it is there
    with c2:
        ok = _results(store, q, k, f_lab, f_pred)
    if ok or "image" not in q:  # an upload is previewed only once the search has read it safely
        with c1:
            _query_view(store, q)
