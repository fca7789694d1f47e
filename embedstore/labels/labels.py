"""Labels, classification, explanations: the LabelMixin the Store inherits.

Tables (LanceDB, in the store):
    labels       id, label, source (human|model), time       one row per labeled image; relabel replaces it
    predictions  id, label (null = unknown), confidence, head, version, time
    evals        written by evaluate.py (few-shot learning curves)

Classes are simply the distinct values of `labels.label`: a class exists once an image carries it.
Heads come from embedstore.labels.heads (make_head); suggestions, evaluation and export live in their own
modules (suggest.py, evaluate.py, export.py) and are exposed here as Store methods.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError

LABELS_SCHEMA = pa.schema(
    [("id", pa.int64()), ("label", pa.string()), ("source", pa.string()), ("time", pa.timestamp("us", tz="UTC"))]
)
PREDICTIONS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("head", pa.string()),
        ("version", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)
SOURCES = ("human", "model")
TEXT_HEADS = ("zeroshot", "fused")
MAX_UNLABELED = 5_000  # unlabeled vectors a head sees while fitting (transductive heads, centering)
NO_LABELS_HINT = "label a few images per class first: embedstore label STORE --class NAME IMAGES..."


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _id_pred(ids: Iterable[int]) -> str:
    return f"id IN ({', '.join(str(int(i)) for i in ids)})"


def _chunks(seq: Sequence, n: int = 2000):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class LabelMixin:
    """Labeling API of the Store: label/unlabel, classify, explain, suggest, evaluate, export."""

    # ---- resolving user items ------------------------------------------------------------------
    def _image_lookup(self) -> tuple[dict[str, int], dict[str, int], set[int]]:
        t = self.read_table("images", ["id", "path", "hash"])
        if t is None:
            return {}, {}, set()
        ids = t.column("id").to_pylist()
        return dict(zip(t.column("path").to_pylist(), ids)), dict(zip(t.column("hash").to_pylist(), ids)), set(ids)

    def resolve_items(self, items: Iterable, base: str | os.PathLike | None = None) -> tuple[list[int], list[str]]:
        """Image ids for `items` (ids, or paths absolute/relative to `base` (default: cwd), files or folders).

        A path not in the store is looked up by content (a copy of a stored image counts); what still
        cannot be found is returned in the second list, never dropped silently.
        """
        items = list(items)
        found: list[int] = []
        unknown: list[str] = []
        for it, ids in zip(items, self._resolve_each(items, base)):
            (found.extend(ids) if ids else unknown.append(str(it)))
        seen: set[int] = set()
        return [i for i in found if not (i in seen or seen.add(i))], unknown

    def _resolve_each(self, items: list, base: str | os.PathLike | None = None) -> list[list[int]]:
        """Per item, the ids it names (empty when not in the store); one read of the images table."""
        from embedstore.store import content_hash

        by_path, by_hash, known = self._image_lookup()
        base = Path(base) if base is not None else Path.cwd()
        out: list[list[int]] = []
        for it in items:
            if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
                out.append([int(it)] if int(it) in known else [])
                continue
            p = Path(str(it)).expanduser()
            p = (p if p.is_absolute() else base / p).resolve()
            key = str(p)
            if key in by_path:
                out.append([by_path[key]])
            elif p.is_dir():
                prefix = key.rstrip(os.sep) + os.sep
                out.append(sorted(i for q, i in by_path.items() if q.startswith(prefix)))
            elif p.is_file() and (h := _safe_hash(content_hash, key)) in by_hash:
                out.append([by_hash[h]])
            else:
                out.append([])
        return out

    # ---- labels ----------------------------------------------------------------------------
    def label(self, items: Iterable, cls: str, source: str = "human", base: str | os.PathLike | None = None) -> dict:
        """Give class `cls` to images (ids or paths); relabels images that had another class.

        Returns dict(label, labeled, relabeled, new_class, unknown (list), unknown_count, ids). Raises
        InvalidArgumentError when none of the items is in the store.
        """
        items = list(items)
        if not items:
            raise EmptyInputError("no images given; pass image paths, folders or ids to label")
        ids, unknown = self.resolve_items(items, base)
        if not ids:
            raise InvalidArgumentError(
                f"none of the {len(items)} item(s) is in the store (first: {unknown[0]}); "
                "add the images first (embedstore add STORE PATHS) or check the paths"
            )
        res = self._write_labels({i: cls for i in ids}, source)
        return {**res, "label": _check_class(cls), "unknown": unknown, "unknown_count": len(unknown), "ids": ids}

    def _write_labels(self, mapping: dict[int, str], source: str = "human") -> dict:
        if source not in SOURCES:
            raise InvalidArgumentError(f"unknown label source {source!r}; use one of {', '.join(SOURCES)}")
        mapping = {int(i): _check_class(c) for i, c in mapping.items()}
        with self.write_lock():
            before = self.labels(source=None)
            t = self.table("labels", LABELS_SCHEMA)
            ids = list(mapping)
            for chunk in _chunks(ids):
                t.delete(_id_pred(chunk))
            now = _now()
            rows = [{"id": i, "label": c, "source": source, "time": now} for i, c in mapping.items()]
            t.add(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA))
            preds = self.table("predictions")
            if preds is not None:  # a labeled image needs no prediction
                for chunk in _chunks(ids):
                    preds.delete(_id_pred(chunk))
        old_classes = set(before.values())
        return {
            "labeled": sum(1 for i, c in mapping.items() if before.get(i) != c),
            "relabeled": sum(1 for i, c in mapping.items() if i in before and before[i] != c),
            "unchanged": sum(1 for i, c in mapping.items() if before.get(i) == c),
            "new_classes": sorted(set(mapping.values()) - old_classes),
            "new_class": bool(set(mapping.values()) - old_classes),
        }

    def label_many(self, pairs: Iterable[tuple], source: str = "human", base: str | os.PathLike | None = None) -> dict:
        """Label (item, class) pairs in one write; unknown items are counted and listed."""
        pairs = list(pairs)
        if not pairs:
            raise EmptyInputError("no (image, class) pairs given")
        mapping: dict[int, str] = {}
        unknown: list[str] = []
        for (item, cls), ids in zip(pairs, self._resolve_each([p[0] for p in pairs], base)):
            if not ids:
                unknown.append(str(item))
            for i in ids:
                mapping[i] = cls
        if not mapping:
            raise InvalidArgumentError(
                f"none of the {len(pairs)} labeled path(s) is in the store (first: {unknown[0]}); "
                "add the images first (embedstore add STORE PATHS) or check the paths"
            )
        res = self._write_labels(mapping, source)
        per_class = dict(sorted(Counter(mapping.values()).items()))
        return {**res, "per_class": per_class, "unknown": unknown, "unknown_count": len(unknown), "ids": sorted(mapping)}

    def label_csv(self, path: str | os.PathLike, source: str = "human") -> dict:
        """Labels from a CSV with columns path,label (paths absolute or relative to the CSV's folder)."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise InvalidArgumentError(f"CSV file {path} not found; pass a CSV with columns path,label")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in cols or "label" not in cols:
                raise InvalidArgumentError(
                    f"{path} has columns {reader.fieldnames}; it needs a header with columns path,label"
                )
            name = {c.strip().lower(): c for c in reader.fieldnames}
            pairs = [
                (r[name["path"]].strip(), r[name["label"]].strip())
                for r in reader
                if (r.get(name["path"]) or "").strip() and (r.get(name["label"]) or "").strip()
            ]
        if not pairs:
            raise EmptyInputError(f"{path} has no rows with both a path and a label")
        return {**self.label_many(pairs, source, base=path.parent), "csv": str(path)}

    def label_folders(self, root: str | os.PathLike, source: str = "human") -> dict:
        """Labels from an ImageFolder layout ROOT/<class>/<image>; the folder name is the class."""
        from embedstore.ingest.pipeline import list_image_files

        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise InvalidArgumentError(f"{root} is not a folder; pass a folder laid out as ROOT/<class>/<image>")
        pairs = []
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files, _ = list_image_files([d])
            pairs += [(f, d.name) for f in files]
        if not pairs:
            raise EmptyInputError(f"no images in class folders under {root}; expected ROOT/<class>/<image>")
        return {**self.label_many(pairs, source), "folders": str(root)}

    def unlabel(self, items: Iterable = (), cls: str | None = None, base: str | os.PathLike | None = None) -> dict:
        """Remove labels of the given images (ids or paths), or of every image of class `cls`."""
        items = list(items)
        if not items and cls is None:
            raise EmptyInputError("nothing to unlabel; pass images (paths or ids) or a class")
        ids, unknown = self.resolve_items(items, base) if items else ([], [])
        if cls is not None:
            cur = self.labels(source=None)
            if cls not in set(cur.values()):
                raise InvalidArgumentError(f"no class {cls!r}; existing classes: {', '.join(self.classes()) or 'none'}")
            ids += [i for i, c in cur.items() if c == cls]
        t = self.table("labels")
        removed = 0
        if ids and t is not None:
            with self.write_lock():
                before = t.count_rows()
                for chunk in _chunks(sorted(set(ids))):
                    t.delete(_id_pred(chunk))
                removed = before - t.count_rows()
        return {"unlabeled": removed, "unknown": unknown, "unknown_count": len(unknown)}

    def labels(self, source: str | None = "human") -> dict[int, str]:
        """{image id: class} of current labels (human ones by default; source=None for all)."""
        where = None if source is None else f"source = '{source}'"
        t = self.read_table("labels", ["id", "label"], where=where)
        if t is None:
            return {}
        return dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))

    def labels_table(self) -> pa.Table:
        """The labels table (id, label, source, time) plus the image path."""
        t = self.read_table("labels")
        if t is None:
            t = LABELS_SCHEMA.empty_table()
        t = t.sort_by("id")
        return t.append_column("path", pa.array(self.paths_for(t.column("id").to_pylist()), pa.string()))

    def classes(self) -> list[str]:
        """Classes in use (every label value), sorted."""
        return sorted(set(self.labels(source=None).values()))

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels(source=None).values()).items()))

    def info_labels(self) -> dict:
        lt, pt = self.table("labels"), self.table("predictions")
        return {
            "labels": 0 if lt is None else lt.count_rows(),
            "classes": len(self.classes()) if lt is not None else 0,
            "predictions": 0 if pt is None else pt.count_rows(),
        }

    # ---- heads -----------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return bool(self.version_info().get("text", False))

    def _labeled_split(self, version: str | None = None):
        """(VectorSet, labeled positions, their classes, unlabeled positions) of the active version."""
        vs = self.vectors(version)
        labels = self.labels(source=None)
        if not labels:
            raise EmptyInputError(f"no labeled images yet; {NO_LABELS_HINT}")
        lab = np.flatnonzero(np.isin(vs.ids, np.fromiter(labels, np.int64, len(labels))))
        if len(lab) == 0:
            raise EmptyInputError(f"no labeled image has a vector in version {vs.version} yet; {NO_LABELS_HINT}")
        y = [labels[int(vs.ids[i])] for i in lab]
        mask = np.ones(len(vs.ids), bool)
        mask[lab] = False
        return vs, lab, y, np.flatnonzero(mask)

    def make_head(self, head: str = "auto", **kw):
        """A head by name, with the backbone's text tower attached where the head can use it."""
        from embedstore.labels.heads import make_head

        if head in TEXT_HEADS and not self.has_text:
            raise NotSupportedError(
                f"head {head!r} needs a backbone with a text tower (open_clip); this store uses "
                f"{self.version_info()['name']}. Use --head knn, centroid, linear, propagate or auto"
            )
        if self.has_text and head in TEXT_HEADS + ("auto",):
            kw.setdefault("text_encoder", self.backbone.embed_texts)
        return make_head(head, **kw)

    def fit_head(self, head: str = "auto", version: str | None = None, max_unlabeled: int = MAX_UNLABELED, **kw):
        """Fit `head` on the labeled vectors; returns (head, VectorSet, labeled positions, unlabeled positions).

        Transductive heads (propagate, CL2N centering) see at most `max_unlabeled` unlabeled vectors (a
        seeded sample), so fitting stays bounded on big collections; predictions still cover every image.
        """
        h = self.make_head(head, **kw)  # a bad head name fails before any reading
        vs, lab, y, unl = self._labeled_split(version)
        classes = sorted(set(y))
        if len(classes) < 2:
            raise EmptyInputError(
                f"only one class ({classes[0]}) is labeled; label a few images of at least one more class"
            )
        pool = unl
        if len(pool) > max_unlabeled:
            pool = np.sort(np.random.default_rng(0).choice(unl, max_unlabeled, replace=False))
        h.fit(vs.vectors[lab], y, unlabeled=vs.vectors[pool] if len(pool) else None)
        return h, vs, lab, unl

    # ---- classify --------------------------------------------------------------------------
    def classify(
        self,
        head: str = "auto",
        threshold: float | None = None,
        explain: bool = False,
        ids: Sequence[int] | None = None,
        k_explain: int = 3,
        persist: bool = True,
        **head_kw,
    ) -> dict:
        """Fit `head` on the labels, predict every unlabeled image (or `ids`), persist the predictions.

        Below `threshold` the label is None (unknown). Returns dict(head, chosen, version, classes,
        predictions=[{id, path, label, confidence, head}], per_class={class: {count, mean_confidence}},
        unknown, n_labels, seconds).
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidArgumentError(f"threshold {threshold} is outside 0..1; pass a probability such as 0.5")
        t0 = time.perf_counter()
        h, vs, lab, unl = self.fit_head(head, **head_kw)
        chosen = _head_label(h, head)
        if ids is not None:
            want = {int(i) for i in ids}
            missing = want - set(vs.ids.tolist())
            if missing:
                raise InvalidArgumentError(f"image id(s) {sorted(missing)[:5]} have no vector; pass ids from the store")
            target = np.flatnonzero(np.isin(vs.ids, np.fromiter(want, np.int64, len(want))))
        else:
            target = unl
        from embedstore.labels.heads import abstain

        P = h.predict_proba(vs.vectors[target]) if len(target) else np.zeros((0, len(h.classes)), np.float32)
        conf = P.max(1) if len(target) else np.zeros(0, np.float32)
        labels_out = abstain(P, threshold, list(h.classes))
        preds = [
            {"id": int(vs.ids[i]), "path": vs.paths[i], "label": c, "confidence": round(float(p), 4), "head": chosen}
            for i, c, p in zip(target, labels_out, conf)
        ]
        if explain and len(target):
            self._attach_explanations(preds, vs, lab, target, k_explain)
        if persist:
            self._write_predictions(preds, vs.version, replace_all=ids is None)
        sums: dict = {c: [0, 0.0] for c in h.classes}
        for p in preds:
            if p["label"] is not None:
                sums[p["label"]][0] += 1
                sums[p["label"]][1] += p["confidence"]
        per_class = {c: {"count": n, "mean_confidence": round(t / n, 4) if n else None} for c, (n, t) in sums.items()}
        return {
            "head": head,
            "chosen": chosen,
            "version": vs.version,
            "classes": list(h.classes),
            "n_labels": int(len(lab)),
            "threshold": threshold,
            "predictions": preds,
            "per_class": per_class,
            "unknown": sum(1 for p in preds if p["label"] is None),
            "seconds": round(time.perf_counter() - t0, 4),
        }

    def _attach_explanations(self, preds: list[dict], vs, lab: np.ndarray, target: np.ndarray, k: int) -> None:
        """preds[i]["explain"] = {neighbors: k nearest labeled examples, prompt_scores (CLIP only)}."""
        cur = self.labels(source=None)
        sims, idx = _neighbors(vs.vectors[target], vs.vectors[lab], k)
        classes = sorted(set(cur[int(i)] for i in vs.ids[lab]))
        T = self._class_text_prototypes(classes) if self.has_text else None
        for r, row_s, row_i, t in zip(preds, sims, idx, target):
            neighbors = [
                {"id": int(vs.ids[lab[j]]), "path": vs.paths[lab[j]], "label": cur[int(vs.ids[lab[j]])], "similarity": round(float(s), 4)}
                for s, j in zip(row_s, row_i)
            ]
            r["explain"] = {"neighbors": neighbors}
            if T is not None:
                r["explain"]["prompt_scores"] = {c: round(float(v), 4) for c, v in zip(classes, T @ vs.vectors[t])}

    def _write_predictions(self, preds: list[dict], version: str, replace_all: bool) -> None:
        now = _now()
        rows = [
            {"id": p["id"], "label": p["label"], "confidence": p["confidence"], "head": p["head"], "version": version, "time": now}
            for p in preds
        ]
        data = pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA)
        with self.write_lock():
            t = self.table("predictions", PREDICTIONS_SCHEMA)
            if replace_all:
                t.delete("true")
            else:
                for chunk in _chunks([r["id"] for r in rows]):
                    t.delete(_id_pred(chunk))
            if rows:
                t.add(data)
            try:  # each classify rewrites the table: drop old versions so the store does not grow
                t.optimize(cleanup_older_than=dt.timedelta(minutes=1))
            except Exception:  # compaction is an optimisation only
                pass

    def predictions(self) -> pa.Table:
        """The persisted predictions (id, label, confidence, head, version, time) plus the image path."""
        t = self.read_table("predictions")
        if t is None:
            t = PREDICTIONS_SCHEMA.empty_table()
        t = t.sort_by("id")
        return t.append_column("path", pa.array(self.paths_for(t.column("id").to_pylist()), pa.string()))

    # ---- explain ---------------------------------------------------------------------------
    def explain(self, id: int | str, k: int = 5) -> dict:  # noqa: A002
        """Why an image gets its class: nearest labeled examples, class similarities, CLIP prompt scores.

        `id` is an image id or path. Returns dict(id, path, label, prediction, neighbors=[{id, path,
        label, similarity}], class_similarity={class: {nearest, centroid}}, prompt_scores or None).
        """
        ids, unknown = self.resolve_items([id])
        if not ids:
            raise InvalidArgumentError(f"image {id} is not in the store; pass an id or a stored image's path")
        iid = ids[0]
        vs, lab, y, _ = self._labeled_split()
        pos = np.flatnonzero(vs.ids == iid)
        if len(pos) == 0:
            raise InvalidArgumentError(f"image {iid} has no vector in version {vs.version}; run embedstore add again")
        x = vs.vectors[pos[0]]
        sims = vs.vectors[lab] @ x
        self_mask = vs.ids[lab] != iid  # an image is not its own evidence
        order = [j for j in np.argsort(-sims) if self_mask[j]][:k]
        neighbors = [
            {"id": int(vs.ids[lab[j]]), "path": vs.paths[lab[j]], "label": y[j], "similarity": round(float(sims[j]), 4)}
            for j in order
        ]
        class_sim = {}
        y_arr = np.array(y, dtype=object)
        for c in sorted(set(y)):
            m = (y_arr == c) & self_mask
            if m.any():
                cen = vs.vectors[lab[m]].mean(0)
                cen /= np.linalg.norm(cen) + 1e-12
                class_sim[c] = {"nearest": round(float(sims[m].max()), 4), "centroid": round(float(cen @ x), 4)}
        pred = None
        pt = self.read_table("predictions", where=f"id = {iid}")
        if pt is not None and pt.num_rows:
            r = pt.to_pylist()[0]
            pred = {"label": r["label"], "confidence": round(float(r["confidence"]), 4), "head": r["head"]}
        prompt_scores = self._prompt_scores(x, sorted(set(y))) if self.has_text else None
        return {
            "id": iid,
            "path": vs.paths[pos[0]],
            "label": self.labels(source=None).get(iid),
            "prediction": pred,
            "neighbors": neighbors,
            "class_similarity": class_sim,
            "prompt_scores": prompt_scores,
        }

    def _class_text_prototypes(self, classes: list[str]) -> np.ndarray:
        """(C, D) prompt-ensemble text embeddings (the zero-shot head's), cached per version and class."""
        from embedstore.labels.heads.zeroshot import TEMPLATES, text_prototypes

        cache = self.__dict__.setdefault("_text_proto_cache", {})
        missing = [c for c in classes if (self.active_version, c) not in cache]
        if missing:
            for c, t in zip(missing, text_prototypes(self.backbone.embed_texts, missing, TEMPLATES)):
                cache[(self.active_version, c)] = t
        return np.stack([cache[(self.active_version, c)] for c in classes])

    def _prompt_scores(self, x: np.ndarray, classes: list[str]) -> dict[str, dict]:
        """Cosine of the image to each class's prompt-ensemble text embedding, and their softmax."""
        T = self._class_text_prototypes(classes)
        s = T @ x
        p = np.exp(100 * (s - s.max()))
        p /= p.sum()
        return {c: {"similarity": round(float(a), 4), "probability": round(float(b), 4)} for c, a, b in zip(classes, s, p)}

    # ---- suggest / evaluate / export (their own modules) ------------------------------------
    def suggest(self, n: int = 24, **kw) -> list[dict]:
        """What to label next: list of dict(id, path, score, reason, prediction, margin); see suggest.py."""
        from embedstore.labels.suggest import suggest

        return suggest(self, n, **kw)

    def evaluate(self, shots: Sequence[int] = (1, 2, 4, 8, 16), episodes: int = 10, heads=None, **kw) -> dict:
        """Few-shot learning curves over the labels for every head; stored in table `evals`. See evaluate.py."""
        from embedstore.labels.evaluate import evaluate

        return evaluate(self, shots=shots, episodes=episodes, heads=heads, **kw)

    def eval_history(self, version: str | None = None) -> list[dict]:
        """Stored eval runs, oldest first, of `version` (default: the active one; "all" for every version)."""
        from embedstore.labels.evaluate import eval_history

        return eval_history(self, version)

    def export(self, fmt: str, out: str | os.PathLike, **kw) -> dict:
        """Export labels and predictions as csv, json or imagefolder; see export.py."""
        from embedstore.labels.export import export

        return export(self, fmt, out, **kw)


# ---- helpers ------------------------------------------------------------------------------------
def _check_class(cls) -> str:
    if not isinstance(cls, str) or not cls.strip():
        raise InvalidArgumentError(f"bad class name {cls!r}; pass a non-empty name such as --class cat")
    cls = cls.strip()
    if "/" in cls or "\\" in cls or cls in (".", ".."):
        raise InvalidArgumentError(f"bad class name {cls!r}: it becomes a folder name on export; drop the slashes")
    return cls


def _safe_hash(fn, path: str) -> str | None:
    try:
        return fn(path)
    except OSError:
        return None


def _head_label(h, requested: str) -> str:
    """The name of what actually predicts: the head's own `chosen` (auto) or its name."""
    chosen = getattr(h, "chosen", None) or getattr(h, "chosen_name", None)
    if chosen:
        return str(chosen)
    return getattr(h, "name", requested) or requested


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
