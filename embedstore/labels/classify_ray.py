"""classify as a Ray job, for stores too big to hold in one process (`embedstore classify STORE --engine ray`).

The driver fits the head on what it needs (the labeled vectors, and a seeded sample of at most
MAX_UNLABELED unlabeled ones for the transductive heads: the same fit as the local engine's), puts the
fitted head in Ray's object store, and Ray Data reads the active version's LanceDB vectors table in
parallel (ray.data.read_lance) and predicts in tasks. Predictions come back to the driver, which appends
them to the predictions table every RAY_COMMIT_ROWS rows, then, in one last commit, deletes the rows
older than this run (images now labeled or removed, and the previous predictions of the predicted ones).
A run that fails midway leaves older rows beside the new ones; readers keep the newest row per image, and
the next classify removes them. The result carries counts per class and the KEEP least confident
predictions (the full list is in the store: `embedstore export`).
"""

from __future__ import annotations

import datetime as dt
import heapq
import time

import numpy as np
import pyarrow as pa

from embedstore.clock import now
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.labels.choice import NO_LABELS_HINT, head_label, describe_choice
from embedstore.results import ClassifyResult, ClassSummary, Prediction
from embedstore.storage import TS, vectors_table_name

RAY_COMMIT_ROWS = 100_000
KEEP = 1000  # least confident predictions returned in the result


def _portable(head):
    """The fitted head without its text encoder (a closure over the store, not picklable; the class text
    prototypes it made are already inside the head)."""
    seen, todo = set(), [head]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        if "text_encoder" in vars(obj):
            obj.text_encoder = None
        for v in vars(obj).values():
            todo.extend(v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v])
    return head


_HEADS: dict = {}  # per worker process: the fitted head of a run, fetched once


def predict_batch(batch: dict, head_ref, labeled_ref, threshold) -> dict:
    """Ray Data stage (a task, fused with the read): vectors -> label, confidence, probability; labeled images
    are dropped. Tasks, not actors: an actor pool holding every CPU would starve the read tasks."""
    import ray

    key = head_ref.hex()
    if key not in _HEADS:
        _HEADS.clear()
        _HEADS[key] = ray.get(head_ref), np.asarray(ray.get(labeled_ref), np.int64)
    head, labeled = _HEADS[key]
    ids = np.asarray(batch["id"], np.int64)
    keep = ~np.isin(ids, labeled)
    ids = ids[keep]
    if not len(ids):
        return {"id": ids, "label": np.array([], object), "confidence": np.zeros(0, np.float32),
                "probability": np.zeros(0, np.float32)}
    X = np.stack(batch["vector"])[keep].astype(np.float32)
    labels, conf, P = head.decide(X, threshold)
    return {"id": ids, "label": np.array([lb if lb is not None else "" for lb in labels], object),
            "confidence": np.asarray(conf, np.float32), "probability": P.max(1).astype(np.float32)}


def classify_ray(svc, engine, head: str = "auto", threshold: float | None = None, **head_kw) -> ClassifyResult:
    """ClassifyService.classify on a Ray cluster (svc: the ClassifyService; engine: a RayEngine)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise InvalidArgumentError(f"threshold {threshold} is outside 0..1; pass a probability such as 0.5")
    t0 = time.perf_counter()
    st = svc.storage
    st.require_writable()
    h, lab_ids, y = _fit(svc, head, **head_kw)
    ray = engine.start()
    version = st.active_version
    run_time = now()
    ds = ray.data.read_lance(st.table_uri(vectors_table_name(version)), columns=["id", "vector"],
                             storage_options=st.storage_options or None)
    ds = ds.map_batches(predict_batch, batch_format="numpy", batch_size=8192,
                        fn_args=(ray.put(_portable(h)), ray.put(lab_ids), threshold))
    chosen = head_label(h, head)
    counts: dict[str, list] = {c: [0, 0.0] for c in h.classes}
    unknown, total, low, buf = 0, 0, [], []
    with st.write_lock():
        from embedstore.ingest.ray_engine import quiet_ray_warnings

        for b in quiet_ray_warnings(ds.iter_batches(batch_size=None, batch_format="numpy")):
            for i, lb, c, p in zip(b["id"], b["label"], b["confidence"], b["probability"]):
                lb = str(lb) or None
                total += 1
                if lb is None:
                    unknown += 1
                else:
                    counts[lb][0] += 1
                    counts[lb][1] += float(c)
                item = (-float(c), int(i), lb, float(p))
                (heapq.heappush if len(low) < KEEP else heapq.heappushpop)(low, item)
                buf.append((int(i), lb, float(c)))
            if len(buf) >= RAY_COMMIT_ROWS:
                _append(st, buf, chosen, version, run_time)
        _append(st, buf, chosen, version, run_time)
        st.table("predictions", create=True).delete(f"time < timestamp '{run_time.isoformat()}'")
        st.compact("predictions", cleanup_older_than=dt.timedelta(minutes=1))
    paths = st.paths_for([i for _, i, _, _ in low])
    preds = [Prediction(i, paths.get(i, ""), lb, round(-nc, 4), chosen, probability=round(p, 4))
             for nc, i, lb, p in sorted(low, reverse=True)]
    return ClassifyResult(
        head=head, chosen=chosen, reason=describe_choice(h, head, len(lab_ids)), version=version,
        classes=list(h.classes), n_labels=len(lab_ids), threshold=threshold, predictions=preds,
        per_class={c: ClassSummary(n, round(t / n, 4) if n else None) for c, (n, t) in counts.items()},
        unknown=unknown, seconds=round(time.perf_counter() - t0, 4), predicted=total,
    )


def _fit(svc, head: str, **kw):
    """Fit as the local engine does (ClassifyService.fit_on), reading only the labeled vectors and the sample of
    unlabeled ones it asks for."""
    st = svc.storage
    h = svc.make_head(head, None, **kw)
    labels = svc.labels.labels(source=None)
    if not labels:
        raise EmptyInputError(f"no labeled images yet; {NO_LABELS_HINT}")
    lab_ids, X = _in_id_order(*st.read_vectors(None, sorted(labels)))
    y = [labels[int(i)] for i in lab_ids]
    unl = np.setdiff1d(st.vector_ids(), lab_ids, assume_unique=True)
    svc.fit_on(h, lab_ids, X, y, unl, lambda ids: _in_id_order(*st.read_vectors(None, ids))[1], None)
    return h, lab_ids, y


def _in_id_order(ids: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    return ids[order], X[order]


def _append(st, buf: list, head: str, version: str, t) -> None:
    if not buf:
        return
    st.add_rows("predictions", pa.table({
        "id": pa.array([r[0] for r in buf], pa.int64()), "label": pa.array([r[1] for r in buf], pa.string()),
        "confidence": pa.array([r[2] for r in buf], pa.float32()), "head": pa.array([head] * len(buf), pa.string()),
        "version": pa.array([version] * len(buf), pa.string()), "time": pa.array([t] * len(buf), TS),
    }))
    buf.clear()
