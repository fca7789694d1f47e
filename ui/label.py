"""Label: the `suggest` batch as a grid; pick or type a class for the selected images; saved at once.

After each save the heads re-run (`store.classify()`, seconds, no training step), so predictions and
the next suggestion batch reflect the new labels straight away.
"""

from __future__ import annotations

import streamlit as st

from . import common


def _new_batch(store, n: int) -> None:
    st.session_state["label_batch"] = None
    st.session_state["label_n"] = n


def _batch(store, n: int) -> list[dict]:
    """The batch on screen: [{id, reason, prediction}] from `store.suggest` (Suggestion results), or the
    first unlabeled images while no suggestion is possible yet."""
    b = st.session_state.get("label_batch")
    if b is None:
        with st.spinner("choosing images to label…"):
            sugg = common.call(store, "suggest", n, default=None)
        if sugg is not None:
            b = [{"id": int(s.id), "reason": s.reason, "prediction": s.prediction} for s in sugg]
        else:
            lab = common.labels(store)
            b = [{"id": int(i), "reason": "unlabeled", "prediction": None}
                 for i in common.image_ids(store) if int(i) not in lab][:n]
        st.session_state["label_batch"] = b
    return b


def _save(store, ids: list[int], cls: str) -> None:
    res = common.run_write(store, store.label, ids, cls)
    if res is None:
        return
    for i in ids:
        st.session_state.pop(f"label_sel_{i}", None)
    msg = f"labeled {len(ids)} image(s) as “{cls}”" + common.waited_note()
    if st.session_state.get("label_refresh", True) and (failed := common.refresh_predictions(store)):
        msg += f"; {failed}"
    st.session_state["label_msg"] = msg
    st.session_state["label_batch"] = None  # the next batch takes the new labels into account
    st.rerun()


def render(store) -> None:
    st.header("Label")
    if msg := st.session_state.pop("label_msg", None):
        st.success(msg)
    counts = common.class_counts(store)
    if counts:
        st.caption("labeled: " + " · ".join(f"**{c}** {n}" for c, n in sorted(counts.items())))
    c1, c2, c3 = st.columns([1, 1, 2])
    n = c1.number_input("batch size", 6, 96, st.session_state.get("label_n", 24), step=6, key="label_n_in")
    c2.button("new batch", key="label_new", on_click=_new_batch, args=(store, int(n)))
    c3.toggle("update predictions after each save", True, key="label_refresh")

    batch = _batch(store, int(n))
    if not batch:
        st.info("every image is labeled")
        return
    ids = [int(b["id"]) for b in batch]
    lab, pred = common.annotate(store, ids)
    items = []
    for b, l, p, c in zip(batch, lab, pred, common.confidences(store, ids)):
        p = p or b["prediction"]
        why = (b["reason"] or "").split(" (")[0]
        items.append({"id": b["id"], "caption": f"#{b['id']} {common.describe(l, p, c)} · {why}".strip()})

    with st.container(border=True):
        cc1, cc2 = st.columns([2, 1])
        with cc1:
            cls = common.class_picker(store, "label")
        chosen = common.selected_ids("label", ids)
        cc2.write("")
        if cc2.button(f"label {len(chosen)} selected", key="label_save", type="primary",
                      disabled=not (chosen and cls)):
            _save(store, chosen, cls)
    common.select_buttons("label", ids)
    common.grid(store, items, "label", selectable=True)
