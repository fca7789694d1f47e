"""Classification: fit a few-shot head on the labels, predict the rest, explain why.

Table `predictions` (id, label (None = unknown), confidence, head, version, time): rewritten by each
`classify`. One meaning of the open-set threshold everywhere (`Head.decide`): an image's confidence is
its calibrated top probability times its familiarity (how close it is to the labeled examples,
compared with how close they are to each other); below the threshold its label is None (unknown).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from embedstore.clock import now
from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError
from embedstore.labels.choice import MAX_UNLABELED, NO_LABELS_HINT, head_label, describe_choice
from embedstore.ingest.backbones.base import Backbone
from embedstore.labels import evaluate as evaluation
from embedstore.labels import export as exporting
from embedstore.labels.heads import make_head
from embedstore.labels.suggest import suggest
from embedstore.labels.heads.zeroshot import TEMPLATES, text_prototypes
from embedstore.labels.labels import LabelService
from embedstore.results import (
    ClassifyResult,
    ClassSummary,
    EvalRun,
    Explanation,
    ExportResult,
    Neighbor,
    Prediction,
    Suggestion,
    VectorSet,
)
from embedstore.storage import Storage

TEXT_HEADS = ("zeroshot", "fused")


class ClassifyService:
    """Heads over the active version's vectors: fit_head, classify, explain, predictions."""

    def __init__(self, storage: Storage, backbone_for: Callable[[str], Backbone], labels: LabelService):
        self.storage = storage
        self.backbone_for = backbone_for
        self.labels = labels
        self._text_protos: dict[tuple[str, str], np.ndarray] = {}

    # ---- heads -----------------------------------------------------------------------------
    def has_text(self, version: str | None = None) -> bool:
        return bool(self.storage.version_info(version).get("text", False))

    def labeled_split(self, version: str | None = None) -> tuple[VectorSet, np.ndarray, list[str], np.ndarray]:
        """(VectorSet, labeled positions, their classes, unlabeled positions) of `version` (default: active)."""
        vs = self.storage.vectors(version)
        labels = self.labels.labels(source=None)
        if not labels:
            raise EmptyInputError(f"no labeled images yet; {NO_LABELS_HINT}")
        lab = np.flatnonzero(np.isin(vs.ids, np.fromiter(labels, np.int64, len(labels))))
        if len(lab) == 0:
            raise EmptyInputError(f"no labeled image has a vector in version {vs.version} yet; {NO_LABELS_HINT}")
        y = [labels[int(vs.ids[i])] for i in lab]
        mask = np.ones(len(vs.ids), bool)
        mask[lab] = False
        return vs, lab, y, np.flatnonzero(mask)

    def make_head(self, head: str = "auto", version: str | None = None, **kw):
        """A head by name, with the version's text tower attached where the head can use it."""
        text = self.has_text(version)
        if head in TEXT_HEADS and not text:
            raise NotSupportedError(
                f"head {head!r} needs a backbone with a text tower (open_clip); this store uses "
                f"{self.storage.version_info(version)['name']}. Use --head knn, centroid, linear, propagate or auto"
            )
        if text and head in TEXT_HEADS + ("auto",):
            kw.setdefault("text_encoder", self._text_encoder(version))
        return make_head(head, **kw)

    def _text_encoder(self, version: str | None) -> Callable:
        v = version or self.storage.active_version
        return lambda texts: self.backbone_for(v).embed_texts(texts)

    def fit_head(self, head: str = "auto", version: str | None = None, max_unlabeled: int = MAX_UNLABELED, **kw):
        """Fit `head` on the labeled vectors; returns (head, VectorSet, labeled positions, unlabeled positions).

        Transductive heads (propagate, CL2N centering) see at most `max_unlabeled` unlabeled vectors (a
        seeded sample), so fitting stays bounded on big collections; predictions still cover every image.
        """
        h = self.make_head(head, version, **kw)  # a bad head name fails before any reading
        vs, lab, y, unl = self.labeled_split(version)
        self.fit_on(h, vs.ids[lab], vs.vectors[lab], y, unl, lambda pos: vs.vectors[pos], vs.version, max_unlabeled)
        return h, vs, lab, unl

    def fit_on(self, h, lab_ids: np.ndarray, X: np.ndarray, y: list[str], unlabeled: np.ndarray, read: Callable,
               version: str | None, max_unlabeled: int = MAX_UNLABELED):
        """The one fit of every engine: at least two classes; auto never judged on images the backbone trained on;
        a seeded sample of at most `max_unlabeled` of `unlabeled` (ids or positions, in id order; `read` gives
        their vectors) for the transductive heads."""
        classes = sorted(set(y))
        if len(classes) < 2:
            raise EmptyInputError(f"only one class ({classes[0]}) is labeled; label a few images of at least one more class")
        if hasattr(h, "score_mask"):
            seen = self.trained_ids(version)
            h.score_mask = ~np.isin(lab_ids, seen) if len(seen) else None
        pool = unlabeled
        if len(pool) > max_unlabeled:
            pool = np.sort(np.random.default_rng(0).choice(pool, max_unlabeled, replace=False))
        return h.fit(X, y, unlabeled=read(pool) if len(pool) else None)

    # ---- classify --------------------------------------------------------------------------
    def classify(
        self,
        head: str = "auto",
        threshold: float | None = None,
        explain: bool = False,
        ids: Sequence[int] | None = None,
        k_explain: int = 3,
        persist: bool = True,
        engine=None,
        **head_kw,
    ) -> ClassifyResult:
        """Fit `head` on the labels, predict every unlabeled image (or `ids`), persist the predictions.
        engine: None (here) or a RayEngine (classify_ray: for stores too big for one process).

        `threshold`: below it (confidence = calibrated top probability x familiarity, see Head.decide)
        the label is None (unknown)."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidArgumentError(f"threshold {threshold} is outside 0..1; pass a probability such as 0.5")
        if engine is not None:
            if explain or ids is not None or not persist:
                raise InvalidArgumentError("--engine ray predicts every unlabeled image and stores the predictions; "
                                           "leave out --explain / ids / persist=False, or use --engine local")
            from embedstore.labels.classify_ray import classify_ray

            return classify_ray(self, engine, head, threshold, **head_kw)
        t0 = time.perf_counter()
        if persist:
            self.storage.require_writable()  # fail before the work, not after it
        h, vs, lab, unl = self.fit_head(head, **head_kw)
        chosen = head_label(h, head)
        target = unl if ids is None else self._positions(vs, ids)
        X = vs.vectors[target]
        labels_out, conf, P = h.decide(X, threshold)
        top = P.max(1) if len(P) else np.zeros(0, np.float32)
        preds = [
            Prediction(int(vs.ids[i]), vs.paths[i], c, round(float(k), 4), chosen, probability=round(float(p), 4))
            for i, c, k, p in zip(target, labels_out, conf, top)
        ]
        if explain and len(target):
            self._attach_explanations(preds, vs, lab, target, k_explain)
        if persist:
            self._write_predictions(preds, vs.version, replace_all=ids is None)
        skipped = self._without_vector(vs) if ids is None else 0
        return ClassifyResult(
            head=head, chosen=chosen, reason=describe_choice(h, head, len(lab)), version=vs.version,
            classes=list(h.classes), n_labels=int(len(lab)), threshold=threshold, predictions=preds,
            per_class=_per_class(preds, h.classes), unknown=sum(1 for p in preds if p.label is None),
            seconds=round(time.perf_counter() - t0, 4), skipped=skipped,
            skipped_reason=None if not skipped else (
                f"{skipped} image(s) have no vector in version {vs.version} (an add that was interrupted) and got no "
                "prediction; run `embedstore add STORE PATHS` again to embed them, then classify"),
        )

    def _without_vector(self, vs: VectorSet) -> int:
        """Images in the store that have no vector in `vs`'s version (left out of a classify)."""
        return len(self.storage.image_ids() - set(vs.ids.tolist()))

    def trained_ids(self, version: str | None = None) -> np.ndarray:
        """Ids of the images a fine-tuned version trained (labels, pseudo-labels) or selected epochs on: their vectors
        look easier than unseen images', so no head is chosen or calibrated on them."""
        ft = self.storage.version_info(version).get("finetune") or {}
        return np.asarray([*ft.get("trained_ids", []), *ft.get("selection_ids", []), *ft.get("pseudo_ids", [])], np.int64)

    @staticmethod
    def _positions(vs: VectorSet, ids: Sequence[int]) -> np.ndarray:
        want = {int(i) for i in ids}
        missing = want - set(vs.ids.tolist())
        if missing:
            raise InvalidArgumentError(f"image id(s) {sorted(missing)[:5]} have no vector; pass ids from the store")
        return np.flatnonzero(np.isin(vs.ids, np.fromiter(want, np.int64, len(want))))

    def _attach_explanations(self, preds: list[Prediction], vs, lab: np.ndarray, target: np.ndarray, k: int) -> None:
        """preds[i].explain = {neighbors: k nearest labeled examples, prompt_scores (CLIP only)}."""
        cur = self.labels.labels(source=None)
        sims, idx = _neighbors(vs.vectors[target], vs.vectors[lab], k)
        classes = sorted(set(cur[int(i)] for i in vs.ids[lab]))
        T = self._class_text_prototypes(classes) if self.has_text() else None
        for r, row_s, row_i, t in zip(preds, sims, idx, target):
            neighbors = [
                Neighbor(int(vs.ids[lab[j]]), vs.paths[lab[j]], cur[int(vs.ids[lab[j]])], round(float(s), 4))
                for s, j in zip(row_s, row_i)
            ]
            r.explain = {"neighbors": neighbors}
            if T is not None:
                r.explain["prompt_scores"] = {c: round(float(v), 4) for c, v in zip(classes, T @ vs.vectors[t])}

    def _write_predictions(self, preds: list[Prediction], version: str, replace_all: bool) -> None:
        t = now()
        rows = [
            {"id": p.id, "label": p.label, "confidence": p.confidence, "head": p.head, "version": version, "time": t}
            for p in preds
        ]
        st = self.storage
        with st.write_lock():
            labeled = set(self.labels.labels(source=None))  # labeled since this classify read the labels: no prediction
            rows = [r for r in rows if r["id"] not in labeled]
            if replace_all:
                st.add_rows("predictions", rows, "replace")  # one commit
            else:
                st.delete_ids("predictions", [r["id"] for r in rows])
                st.add_rows("predictions", rows)
            # each classify rewrites the table: drop old versions so the store does not grow
            st.compact("predictions", cleanup_older_than=dt.timedelta(minutes=1))

    def predictions(self) -> pa.Table:
        """The persisted predictions (id, label, confidence, head, version, time) plus the image path."""
        return self.storage.read_with_paths("predictions")

    # ---- explain ---------------------------------------------------------------------------
    def explain(self, id: int | str, k: int = 5) -> Explanation:  # noqa: A002
        """Why an image gets its class: nearest labeled examples, class similarities, CLIP prompt scores.

        `id` is an image id or path. Returns dict(id, path, label, prediction, neighbors=[{id, path,
        label, similarity}], class_similarity={class: {nearest, centroid}}, prompt_scores or None).
        """
        ids, unknown = self.labels.resolve_items([id])
        if not ids:
            raise InvalidArgumentError(f"image {id} is not in the store; pass an id or a stored image's path")
        iid = ids[0]
        vs, lab, y, _ = self.labeled_split()
        pos = np.flatnonzero(vs.ids == iid)
        if len(pos) == 0:
            raise InvalidArgumentError(f"image {iid} has no vector in version {vs.version}; run embedstore add again")
        x = vs.vectors[pos[0]]
        sims = vs.vectors[lab] @ x
        self_mask = vs.ids[lab] != iid  # an image is not its own evidence
        order = [j for j in np.argsort(-sims) if self_mask[j]][:k]
        neighbors = [Neighbor(int(vs.ids[lab[j]]), vs.paths[lab[j]], y[j], round(float(sims[j]), 4)) for j in order]
        class_sim = {}
        y_arr = np.array(y, dtype=object)
        for c in sorted(set(y)):
            m = (y_arr == c) & self_mask
            if m.any():
                cen = vs.vectors[lab[m]].mean(0)
                cen /= np.linalg.norm(cen) + 1e-12
                class_sim[c] = {"nearest": round(float(sims[m].max()), 4), "centroid": round(float(cen @ x), 4)}
        pred = None
        pt = self.storage.read_ids("predictions", [iid])
        if pt is not None and pt.num_rows:
            r = pt.to_pylist()[0]
            pred = {"label": r["label"], "confidence": round(float(r["confidence"]), 4), "head": r["head"]}
        prompt_scores = self._prompt_scores(x, sorted(set(y))) if self.has_text() else None
        return Explanation(
            id=iid, path=vs.paths[pos[0]], label=self.labels.labels(source=None).get(iid), prediction=pred,
            neighbors=neighbors, class_similarity=class_sim, prompt_scores=prompt_scores,
        )

    def _class_text_prototypes(self, classes: list[str]) -> np.ndarray:
        """(C, D) prompt-ensemble text embeddings (the zero-shot head's), cached per version and class."""
        v = self.storage.active_version
        missing = [c for c in classes if (v, c) not in self._text_protos]
        if missing:
            for c, t in zip(missing, text_prototypes(self._text_encoder(v), missing, TEMPLATES)):
                self._text_protos[(v, c)] = t
        return np.stack([self._text_protos[(v, c)] for c in classes])

    def _prompt_scores(self, x: np.ndarray, classes: list[str]) -> dict[str, dict]:
        """Cosine of the image to each class's prompt-ensemble text embedding, and their softmax."""
        T = self._class_text_prototypes(classes)
        s = T @ x
        p = np.exp(100 * (s - s.max()))
        p /= p.sum()
        return {c: {"similarity": round(float(a), 4), "probability": round(float(b), 4)} for c, a, b in zip(classes, s, p)}


    # ---- suggest / evaluate / export (their own modules) ------------------------------------
    def suggest(self, n: int = 24, **kw) -> list[Suggestion]:
        """What to label next; see labels/suggest.py."""
        return suggest(self, n, **kw)

    def evaluate(self, shots: Sequence[int] = evaluation.DEFAULT_SHOTS, episodes: int = 10, heads=None, **kw) -> EvalRun:
        """Few-shot learning curves over the labels for every head; stored in table `evals`. See labels/evaluate.py."""
        return evaluation.evaluate(self, shots=shots, episodes=episodes, heads=heads, **kw)

    def eval_history(self, version: str | None = None) -> list[EvalRun]:
        """Stored eval runs, oldest first, of `version` (default: the active one; "all" for every version)."""
        return evaluation.eval_history(self.storage, version)

    def export(self, fmt: str, out, **kw) -> ExportResult:
        """Export labels and predictions as csv, json or imagefolder; see labels/export.py."""
        return exporting.export(self, fmt, out, **kw)


# ---- helpers ------------------------------------------------------------------------------------
def _per_class(preds: list[Prediction], classes: Sequence[str]) -> dict[str, ClassSummary]:
    sums: dict = {c: [0, 0.0] for c in classes}
    for p in preds:
        if p.label is not None:
            sums[p.label][0] += 1
            sums[p.label][1] += p.confidence
    return {c: ClassSummary(n, round(t / n, 4) if n else None) for c, (n, t) in sums.items()}


def _neighbors(Q: np.ndarray, L: np.ndarray, k: int, block: int = 8192):
    """Top-k cosine neighbours of each row of Q among L (both L2-normalised): (sims, idx), each (M, k)."""
    k = min(k, len(L))
    sims_out, idx_out = [], []
    for i in range(0, len(Q), block):
        S = Q[i : i + block] @ L.T
        idx = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < L.shape[0] else np.tile(np.arange(len(L)), (len(S), 1))
        s = np.take_along_axis(S, idx, 1)
        o = np.argsort(-s, axis=1)
        sims_out.append(np.take_along_axis(s, o, 1))
        idx_out.append(np.take_along_axis(idx, o, 1))
    return np.concatenate(sims_out), np.concatenate(idx_out)
