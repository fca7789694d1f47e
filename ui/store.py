"""Store: backbone versions, counts, the few-shot learning curve from stored evaluations, errors."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from . import common, thumbs


def _versions(store) -> pd.DataFrame:
    rows = common.call(store, "versions", default=[]) or []  # list[VersionRow]
    return pd.DataFrame([r.to_dict() for r in rows])


RUN_COLUMNS = ("run_id", "time", "version", "n_labels", "n_classes", "best_head", "best_accuracy")


def _learning_curve(store) -> None:
    hist = common.call(store, "eval_history", "all", default=[]) or []  # list[EvalRun], oldest first
    rows = []
    for run in hist:
        for r in curve_rows(run):
            rows.append({**r, "run": str(run.run_id or ""), "version": run.version or ""})
    if not rows:
        st.caption("no evaluation yet: run `embedstore eval STORE` or use the Review page")
        return
    df = pd.DataFrame(rows)
    import plotly.express as px

    last = df[df["run"] == df["run"].iloc[-1]]
    fig = px.line(last, x="shots", y="accuracy", color="head", markers=True,
                  error_y="std" if last["std"].notna().any() else None,
                  labels={"shots": "labeled images per class", "accuracy": "accuracy"},
                  title=f"learning curve (latest run, version {last['version'].iloc[0]})")
    fig.update_xaxes(type="log", tickvals=sorted(last["shots"].unique()))
    fig.update_yaxes(range=[0, 1.02])
    st.plotly_chart(fig)
    runs = pd.DataFrame([{k: getattr(run, k) for k in RUN_COLUMNS} for run in hist]).dropna(axis=1, how="all")
    st.dataframe(runs, width="stretch", hide_index=True)


def curve_rows(run) -> list[dict]:
    """(head, shots, accuracy, std) rows of one EvalRun: run.heads = {head: {"shots": {mean, std, episodes}}}."""
    out = []
    for head, pts in (run.heads or {}).items():
        for s, p in sorted((pts or {}).items(), key=lambda kv: int(kv[0])):
            out.append({"head": head, "shots": int(s), "accuracy": p.get("mean"), "std": p.get("std")})
    return out


def render(store) -> None:
    st.header("Store")
    info = store.info()  # a StoreInfo
    cols = st.columns(5)
    for col, (value, label) in zip(cols, [(info.images, "images"), (info.vectors, "vectors"), (info.labels, "labels"),
                                          (info.predictions, "predictions"), (info.errors, "errors")]):
        col.metric(label, f"{value or 0:,}")
    st.caption(f"`{info.path}` · backbone **{info.backbone}** · version `{info.version}` · dim {info.dim}"
               + (" · text search" if info.text else ""))

    st.subheader("Backbone versions")
    st.dataframe(_versions(store), width="stretch", hide_index=True)

    st.subheader("Evaluation")
    _learning_curve(store)

    st.subheader("Errors")
    errs = store.errors()
    if errs:
        st.dataframe(pd.DataFrame([e.to_dict() for e in errs[:1000]]), width="stretch", hide_index=True)
        if len(errs) > 1000:
            st.caption(f"first 1,000 of {len(errs):,}; all of them: `embedstore info STORE --json`")
    else:
        st.caption("no unreadable images")

    n, size = thumbs.cache_size(store.root)
    st.caption(f"thumbnail cache: {n:,} files, {size / 1e6:.1f} MB in `{thumbs.thumb_dir(store.root)}`")
    with st.expander("all counts"):
        st.json(info.to_dict())
