"""Store: backbone versions, counts, the few-shot learning curve from stored evaluations, errors."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from . import common, thumbs


def _versions(store) -> pd.DataFrame:
    df = pd.DataFrame(common.call(store, "versions", default=[]) or [])
    if "version" in df and "active" not in df:
        df.insert(0, "active", df["version"] == store.active_version)
    return df


def _learning_curve(store) -> None:
    hist = common.call(store, "eval_history", "all", default=[]) or []
    rows = []
    for run in hist:
        for r in curve_rows(run):
            rows.append({**r, "run": str(run.get("run_id", "")), "version": run.get("version", "")})
    if not rows:
        st.caption("no evaluation yet: run `embedstore eval STORE` or use the Review page")
        return
    df = pd.DataFrame(rows)
    import plotly.express as px

    last = df[df["run"] == df["run"].iloc[-1]]
    fig = px.line(last, x="shots", y="accuracy", color="head", markers=True,
                  error_y="std" if "std" in last and last["std"].notna().any() else None,
                  labels={"shots": "labeled images per class", "accuracy": "accuracy"},
                  title=f"learning curve (latest run, version {last['version'].iloc[0]})")
    fig.update_xaxes(type="log", tickvals=sorted(last["shots"].unique()))
    fig.update_yaxes(range=[0, 1.02])
    st.plotly_chart(fig)
    runs = pd.DataFrame([{k: run.get(k) for k in ("run_id", "time", "version", "n_labels", "n_classes", "best_head",
                                                  "best_accuracy")} for run in hist]).dropna(axis=1, how="all")
    st.dataframe(runs, width="stretch", hide_index=True)


def curve_rows(run: dict) -> list[dict]:
    """(head, shots, accuracy, std) rows from one stored eval run, whatever nesting evaluate.py used."""
    res = run.get("results", run)  # evaluate.py: results.heads = {head: {shots: {mean, std, episodes}}}
    curves = res.get("heads") or res.get("curves") or {}
    out = []
    if isinstance(curves, dict):
        for head, pts in curves.items():
            if isinstance(pts, dict):  # {shots: acc} or {shots: {mean, std}}
                pts = [{"shots": s, **(v if isinstance(v, dict) else {"mean": v})} for s, v in pts.items()]
            for p in pts or []:
                if isinstance(p, dict) and "shots" in p:
                    out.append({"head": head, "shots": int(p["shots"]),
                                "accuracy": p.get("mean", p.get("accuracy")), "std": p.get("std")})
    elif isinstance(curves, list):
        for p in curves:
            if isinstance(p, dict) and "shots" in p:
                out.append({"head": p.get("head", "?"), "shots": int(p["shots"]),
                            "accuracy": p.get("mean", p.get("accuracy")), "std": p.get("std")})
    return out


def render(store) -> None:
    st.header("Store")
    info = store.info()
    cols = st.columns(5)
    for col, (k, label) in zip(cols, [("images", "images"), ("vectors", "vectors"), ("labels", "labels"),
                                      ("predictions", "predictions"), ("errors", "errors")]):
        col.metric(label, f"{info.get(k, 0):,}")
    st.caption(f"`{info['path']}` · backbone **{info['backbone']}** · version `{info['version']}` · dim {info['dim']}"
               + (" · text search" if info.get("text") else ""))

    st.subheader("Backbone versions")
    st.dataframe(_versions(store), width="stretch", hide_index=True)

    st.subheader("Evaluation")
    _learning_curve(store)

    st.subheader("Errors")
    errs = store.errors()
    if errs:
        st.dataframe(pd.DataFrame(errs[:1000]), width="stretch", hide_index=True)
        if len(errs) > 1000:
            st.caption(f"first 1,000 of {len(errs):,}; all of them: `embedstore info STORE --json`")
    else:
        st.caption("no unreadable images")

    n, size = thumbs.cache_size(store.root)
    st.caption(f"thumbnail cache: {n:,} files, {size / 1e6:.1f} MB in `{thumbs.thumb_dir(store.root)}`")
    with st.expander("all counts"):
        st.json(info)
