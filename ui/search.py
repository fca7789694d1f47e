"""Search: by uploaded image, by text (CLIP backbones), or by any image in the store ("similar").

Without a query the page browses the store, paged. Filters (label / prediction) apply to both.
"""

from __future__ import annotations

import hashlib
import io

import streamlit as st
from PIL import Image

from . import common


def _on_upload() -> None:
    f = st.session_state.get("search_upload")
    if f is not None:
        data = f.getvalue()
        st.session_state["search_query"] = {"image": data, "name": f.name, "sha": hashlib.sha1(data).hexdigest()}


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


def _query_view(store, q: dict) -> None:
    """Show what the search is for, next to the results."""
    if "id" in q:
        f = common.thumbs.thumbnails(store, [q["id"]]).get(q["id"])
        if f is not None:
            st.image(str(f), caption=f"query: image #{q['id']}", width=160)
    elif "image" in q:
        st.image(Image.open(io.BytesIO(q["image"])), caption=f"query: {q['name']}", width=160)
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


@st.cache_data(max_entries=32, show_spinner=False)
def _run_search(root: str, vkey: tuple, tkey: tuple, qkey: tuple, k: int, where: str | None, _store, _q: dict) -> list:
    kw = {"k": k, "where": where}
    if "image" in _q:
        kw["image"] = Image.open(io.BytesIO(_q["image"])).convert("RGB")
    elif "text" in _q:
        kw["text"] = _q["text"]
    else:
        kw["id"] = _q["id"]
    return _store.search(**kw)  # list[Hit]


def _results(store, q: dict, k: int, f_lab: set, f_pred: set) -> None:
    qkey = tuple(sorted((a, b) for a, b in q.items() if a != "image"))
    tkey = common.data_key(store, "labels", "predictions")
    try:
        with st.spinner("searching…"):
            hits = _run_search(str(store.root), common.embeddings_key(store), tkey, qkey, k, where_clause(f_lab, f_pred),
                               store, q)
    except common.EmbedstoreError as e:
        st.error(str(e))
        return
    conf = common.confidences(store, [h.id for h in hits])
    shown = [{"id": h.id, "caption": f"{h.score:.3f} · #{h.id} " + common.describe(h.label, h.prediction, c)}
             for h, c in zip(hits, conf)]
    what = "other images nearest to it" if "id" in q else "nearest images"
    st.caption(f"{len(shown)} {what} (cosine similarity)" + (" matching the filters" if f_lab or f_pred else ""))
    common.grid(store, shown, "search_res")


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
    with c1:
        _query_view(store, q)
        st.button("clear query", key="search_clear", on_click=_clear)
    with c2:
        _results(store, q, k, f_lab, f_pred)
