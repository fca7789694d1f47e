"""Map: a 2-D projection (PCA, or UMAP when installed) of a sample of the embeddings.

Coloured by label or prediction; hovering a point shows its thumbnail; dragging a box over a region
lists the images inside it. The projection is cached per data version of the vectors and sample size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from . import common, thumbs

UNLABELED = "(unlabeled)"


def _umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


@st.cache_data(max_entries=4, show_spinner="projecting embeddings…")
def _layout(root: str, vkey: tuple, n: int, method: str, _store) -> pd.DataFrame:
    ids = common.image_ids(_store)
    if len(ids) > n:  # a fixed random sample: the map of 100k images shows n of them
        ids = np.sort(np.random.default_rng(0).choice(ids, n, replace=False))
    vs = _store.vectors(ids=[int(i) for i in ids])
    X = vs.vectors
    if len(X) < 3:
        return pd.DataFrame({"id": vs.ids, "x": np.zeros(len(X)), "y": np.zeros(len(X))})
    if method == "UMAP":
        import umap

        xy = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(X)
    else:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=0).fit_transform(X)
    return pd.DataFrame({"id": vs.ids.astype(np.int64), "x": xy[:, 0].astype(float), "y": xy[:, 1].astype(float)})


@st.cache_data(max_entries=4, show_spinner="making thumbnails…")
def _previews(root: str, ids: tuple, _store) -> list[str]:
    files = thumbs.thumbnails(_store, ids, workers=8)
    return [thumbs.data_uri(files.get(i)) for i in ids]


def render(store) -> None:
    st.header("Map")
    total = len(common.image_ids(store))
    if total == 0:
        st.info("the store has no images yet")
        return
    methods = ["PCA"] + (["UMAP"] if _umap_available() else [])
    c1, c2, c3 = st.columns(3)
    method = c1.radio("projection", methods, key="map_method", horizontal=True,
                      help=None if len(methods) > 1 else "pip install umap-learn for UMAP")
    color = c2.radio("colour by", ["label", "prediction"], key="map_color", horizontal=True)
    n = min(total, 2000)
    if total > 200:
        n = int(c3.select_slider("points", [v for v in (200, 500, 1000, 2000, 5000, 10000) if v < total] + [total],
                                 value=min(total, 1000), key="map_n"))
    df = _layout(str(store.root), common.embeddings_key(store), n, method, store).copy()
    lab, pred = common.annotate(store, df["id"].tolist())
    df["label"] = [l or UNLABELED for l in lab]
    df["prediction"] = [l or p or common.UNKNOWN for l, p in zip(lab, pred)]
    df["image"] = _previews(str(store.root), tuple(int(i) for i in df["id"]), store)

    import altair as alt

    classes = sorted(c for c in df[color].unique() if c not in (UNLABELED, common.UNKNOWN))
    palette = ["#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
               "#17becf", "#bcbd22", "#8c564b"]
    rest = [v for v in (UNLABELED, common.UNKNOWN) if (df[color] == v).any()]  # drawn grey
    scale = alt.Scale(domain=classes + rest, range=[palette[i % len(palette)] for i in range(len(classes))]
                      + ["#c7c7c7"] * len(rest))
    brush = alt.selection_interval(name="region", encodings=["x", "y"])
    chart = (
        alt.Chart(df)
        .mark_circle(size=60, opacity=0.85)
        .encode(
            x=alt.X("x:Q", axis=None),
            y=alt.Y("y:Q", axis=None),
            color=alt.Color(f"{color}:N", scale=scale, legend=alt.Legend(title=color)),
            tooltip=[alt.Tooltip("image:N", title="image"), "id:Q", "label:N", "prediction:N"],
        )
        .add_params(brush)
        .properties(height=520)
    )
    st.caption(f"{len(df):,} of {total:,} images · {method} · hover a point for its thumbnail, drag a box to list a region")
    event = st.altair_chart(chart, on_select="rerun", selection_mode="region", key="map_chart")
    region = (event or {}).get("selection", {}).get("region") or {}
    if not region.get("x") or not region.get("y"):
        return
    (x0, x1), (y0, y1) = sorted(region["x"]), sorted(region["y"])
    inside = df[df["x"].between(x0, x1) & df["y"].between(y0, y1)]
    st.subheader(f"{len(inside)} images in the region")
    sl = common.pager(len(inside), "map_sel", 24)
    items = []
    for r in inside.iloc[sl].itertuples():
        lab = None if r.label == UNLABELED else r.label
        items.append({"id": int(r.id), "caption": f"#{int(r.id)} {common.describe(lab, None if lab else r.prediction)}"})
    common.grid(store, items, "map_sel")
