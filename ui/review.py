"""Review: predictions per class by confidence, the unknown bucket, bulk accept/correct, and why.

"why" opens `store.explain(id)`: the nearest labeled examples behind a prediction. Counts come from the
cached predictions and labels; the confusion view from the latest stored `evaluate` run (an EvalRun).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from . import common


def _open_explain(i: int) -> None:
    st.session_state["review_explain"] = int(i)


def _close_explain() -> None:
    st.session_state.pop("review_explain", None)


def _explain(store, i: int) -> None:
    with st.container(border=True):
        c1, c2 = st.columns([6, 1])
        c1.subheader(f"Why image #{i}?")
        c2.button("close", key="review_explain_close", on_click=_close_explain)
        ex = common.call(store, "explain", i, k=6)  # an Explanation
        if ex is None:
            return
        p = ex.prediction or {}  # {label, confidence, head} when a prediction is persisted
        st.markdown(
            f"label: **{ex.label or '—'}** · prediction: **{p.get('label') or common.UNKNOWN}**"
            + (f" ({p['confidence']:.2f}, {p.get('head', '')})" if p.get("confidence") is not None else "")
        )
        q, rest = st.columns([1, 5])
        f = common.thumbs.thumbnails(store, [i]).get(i)
        if f is not None:
            q.image(str(f), caption=f"#{i}", width="stretch")
        with rest:
            st.caption("nearest labeled examples")
            items = [{"id": n.id, "caption": f"{n.similarity:.3f} · ✓ {n.label}"} for n in ex.neighbors]
            common.grid(store, items, "review_ex", neighbours=False)
        if ex.class_similarity:
            df = pd.DataFrame(ex.class_similarity).T.rename_axis("class")
            if ex.prompt_scores:
                df = df.join(pd.DataFrame(ex.prompt_scores).T.add_prefix("prompt_"))
            st.dataframe(df, width="stretch")


def _counts(store, preds: pd.DataFrame, labels: dict) -> pd.DataFrame:
    lab = pd.Series(list(labels.values()), dtype=object).value_counts().rename("labeled")
    p = preds["label"].fillna(common.UNKNOWN)
    g = pd.DataFrame({"label": p, "confidence": preds["confidence"]}).groupby("label")["confidence"]
    df = pd.concat([lab, g.size().rename("predicted"), g.mean().round(3).rename("mean confidence")], axis=1)
    return df.fillna({"labeled": 0, "predicted": 0}).astype({"labeled": int, "predicted": int}).rename_axis("class")


def _evaluation(store) -> None:
    hist = common.call(store, "eval_history", default=[]) or []
    if st.button("run evaluation now", key="review_eval"):
        with st.spinner("few-shot evaluation…"):
            done = common.run_write(store, store.evaluate)
        if done is not None:  # else the one-line error stays on the page
            st.rerun()
    if not hist:
        st.caption("no evaluation yet: press the button, or run `embedstore eval STORE`")
        return
    last = hist[-1]  # the latest EvalRun
    conf = last.confusion  # {head, shots, classes, matrix (rows true, columns predicted)} or None
    if conf and conf.get("classes") and conf.get("matrix"):
        import plotly.express as px

        classes = conf["classes"]
        fig = px.imshow(conf["matrix"], x=classes, y=classes, text_auto=True, color_continuous_scale="Blues",
                        labels={"x": "predicted", "y": "true", "color": "images"})
        fig.update_layout(height=120 + 32 * len(classes), margin=dict(l=0, r=0, t=30, b=0),
                          title=f"confusion ({conf.get('head') or last.best_head or ''})")
        st.plotly_chart(fig)
    from .store import curve_rows

    curve = pd.DataFrame(curve_rows(last))
    if not curve.empty:
        st.caption(f"few-shot accuracy by head and labeled images per class ({last.tested_on()}, "
                   f"best: {last.best_head})")
        st.dataframe(curve.pivot_table(index="head", columns="shots", values="accuracy"), width="stretch")
    elif not conf:
        st.json(last.to_dict(), expanded=False)
    # the curve is measured on the labels (hard ones, when suggest chose them): what to expect on the rest
    est = last.unlabeled_estimate
    (st.warning if est and est.get("harder_labels") else st.info)(last.estimate_line(), icon=":material/insights:")
    if (plat := common.call(store, "plateau")) is not None:
        st.caption(f"plateau: {'yes' if plat.plateau else 'no'} ({plat.reason})")


def _apply(store, ids: list[int], cls: str, verb: str) -> None:
    if common.run_write(store, store.label, ids, cls) is None:
        return
    for i in ids:
        st.session_state.pop(f"review_sel_{i}", None)
    msg = f"{verb} {len(ids)} image(s) as “{cls}”" + common.waited_note()
    if failed := common.refresh_predictions(store):
        msg += f"; {failed}"
    st.session_state["review_msg"] = msg
    st.rerun()


def render(store) -> None:
    st.header("Review")
    if msg := st.session_state.pop("review_msg", None):
        st.success(msg)
    if (i := st.session_state.get("review_explain")) is not None:
        _explain(store, i)

    preds, labels = common.predictions(store), common.labels(store)
    with st.expander("per-class counts and evaluation", expanded=False):
        c1, c2 = st.columns(2)
        with c1:
            st.dataframe(_counts(store, preds, labels), width="stretch")
        with c2:
            _evaluation(store)
    if len(preds) == 0:
        st.info("no predictions yet: label a few images of two or more classes (Label page), "
                "or run `embedstore classify STORE`")
        if st.button("classify now", key="review_classify") and not common.refresh_predictions(store):
            st.rerun()
        return

    pending = preds[~preds["id"].isin(list(labels))]  # labeled since the last classify: nothing to review
    heads = sorted(preds["head"].dropna().unique().tolist())
    chosen, why = st.session_state.get("classify_reason", (None, ""))
    if heads:  # what predicted, and why when this session's refresh made these predictions
        st.caption(f"predicted by {', '.join(heads)}" + (f" — {why}" if heads == [chosen] else ""))
    buckets = sorted(pending["label"].dropna().unique().tolist())
    counts = pending["label"].fillna(common.UNKNOWN).value_counts().to_dict()
    opts = buckets + [common.UNKNOWN]
    c1, c2 = st.columns([2, 1])
    cls = c1.selectbox("predicted class", opts, key="review_class",
                       format_func=lambda c: f"{c} ({counts.get(c, 0)})")
    order = c2.radio("order", ["most confident first", "least confident first"], key="review_order", horizontal=True)
    rows = pending[pending["label"].isna()] if cls == common.UNKNOWN else pending[pending["label"] == cls]
    rows = rows.sort_values("confidence", ascending=order.startswith("least"))
    if rows.empty:
        st.info("nothing to review in this bucket")
        return
    sl = common.pager(len(rows), f"review_{cls}", 24)
    page = rows.iloc[sl]
    ids = [int(i) for i in page["id"]]
    chosen = common.selected_ids("review", ids)

    with st.container(border=True):
        a1, a2, a3 = st.columns([1, 2, 1])
        if cls != common.UNKNOWN:
            a1.write("")
            if a1.button(f"accept {len(chosen)} as “{cls}”", key="review_accept", type="primary", disabled=not chosen):
                _apply(store, chosen, cls, "accepted")
        with a2:
            new = common.class_picker(store, "review", label="correct to")
        a3.write("")
        if a3.button(f"correct {len(chosen)}", key="review_correct", disabled=not (chosen and new)):
            _apply(store, chosen, new, "corrected")
    common.select_buttons("review", ids)
    items = [{"id": int(r.id), "caption": f"#{int(r.id)} ≈ {r.label or common.UNKNOWN} ({r.confidence:.2f})"}
             for r in page.itertuples()]
    common.grid(store, items, "review", selectable=True, extra=(":material/help:", _open_explain, "why: the nearest labeled examples behind this prediction"))
