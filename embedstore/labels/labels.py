"""Labels: give classes to images, take them away, read them back.

Table `labels` (id, label, source (human|model), time): one row per labeled image; relabeling replaces
it. Classes are simply the distinct values of `labels.label`: a class exists once an image carries it.
Items are image ids or paths (files or folders, absolute or relative to `base`); a path not in the
store is looked up by content, so a copy of a stored image counts. What cannot be found is returned,
never dropped silently.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from embedstore.clock import now
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.ingest.images import list_image_files
from embedstore.ingest.sources import is_uri
from embedstore.results import LabelResult, UnlabelResult
from embedstore.storage import Storage, content_hash

SOURCES = ("human", "model")


class LabelService:
    """label / label_many / label_csv / label_folders / unlabel, and the label reads."""

    def __init__(self, storage: Storage):
        self.storage = storage

    # ---- resolving user items ------------------------------------------------------------------
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
        by_path, by_hash = self.storage.image_index()
        known = self.storage.image_ids()
        base = Path(base) if base is not None else Path.cwd()
        out: list[list[int]] = []
        for it in items:
            if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
                out.append([int(it)] if int(it) in known else [])
                continue
            if is_uri(it):  # s3://bucket/key (an image) or s3://bucket/prefix/ (every image below it)
                prefix = str(it).rstrip("/") + "/"
                out.append([by_path[it]] if it in by_path else sorted(i for q, i in by_path.items() if q.startswith(prefix)))
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
    def label(self, items: Iterable, cls: str, source: str = "human", base: str | os.PathLike | None = None) -> LabelResult:
        """Give class `cls` to images (ids or paths); relabels images that had another class.

        Raises InvalidArgumentError when none of the items is in the store."""
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
        res.label, res.unknown, res.ids = _check_class(cls), unknown, ids
        return res

    def _write_labels(self, mapping: dict[int, str], source: str = "human") -> LabelResult:
        if source not in SOURCES:
            raise InvalidArgumentError(f"unknown label source {source!r}; use one of {', '.join(SOURCES)}")
        mapping = {int(i): _check_class(c) for i, c in mapping.items()}
        st = self.storage
        with st.write_lock():
            before = self.labels(source=None)
            t = now()  # one commit: a kill leaves the old labels or the new ones, never none
            st.add_rows("labels", [{"id": i, "label": c, "source": source, "time": t} for i, c in mapping.items()], "upsert")
            st.delete_ids("predictions", list(mapping))  # a labeled image needs no prediction
        return LabelResult(
            labeled=sum(1 for i, c in mapping.items() if before.get(i) != c),
            relabeled=sum(1 for i, c in mapping.items() if i in before and before[i] != c),
            unchanged=sum(1 for i, c in mapping.items() if before.get(i) == c),
            new_classes=sorted(set(mapping.values()) - set(before.values())),
            ids=sorted(mapping),
        )

    def label_many(self, pairs: Iterable[tuple], source: str = "human", base: str | os.PathLike | None = None) -> LabelResult:
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
        res.per_class, res.unknown = dict(sorted(Counter(mapping.values()).items())), unknown
        return res

    def label_csv(self, path: str | os.PathLike, source: str = "human") -> LabelResult:
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
            rows = [((r.get(name["path"]) or "").strip(), (r.get(name["label"]) or "").strip()) for r in reader]
        pairs = [(p, c) for p, c in rows if p and c]
        skipped = sum(1 for p, c in rows if (p or c) and not (p and c))  # blank lines are not rows
        if not pairs:
            raise EmptyInputError(
                f"{path} has no rows with both a path and a label"
                + (f" ({skipped} row(s) miss one of them)" if skipped else "")
            )
        res = self.label_many(pairs, source, base=path.parent)
        res.source_file, res.skipped_rows = str(path), skipped
        return res

    def label_folders(self, root: str | os.PathLike, source: str = "human") -> LabelResult:
        """Labels from an ImageFolder layout ROOT/<class>/<image>; the folder name is the class."""
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise InvalidArgumentError(f"{root} is not a folder; pass a folder laid out as ROOT/<class>/<image>")
        pairs = []
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files, _ = list_image_files([d])
            pairs += [(f, d.name) for f in files]
        if not pairs:
            raise EmptyInputError(f"no images in class folders under {root}; expected ROOT/<class>/<image>")
        res = self.label_many(pairs, source)
        res.source_file = str(root)
        return res

    def unlabel(self, items: Iterable = (), cls: str | None = None, base: str | os.PathLike | None = None) -> UnlabelResult:
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
        st = self.storage
        removed = 0
        if ids:
            with st.write_lock():
                before = st.count("labels")
                st.delete_ids("labels", ids)
                removed = before - st.count("labels")
        return UnlabelResult(unlabeled=removed, unknown=unknown)

    def labels(self, source: str | None = "human") -> dict[int, str]:
        """{image id: class} of current labels (human ones by default; source=None for all)."""
        where = None if source is None else f"source = '{source}'"
        t = self.storage.read_table("labels", ["id", "label"], where=where)
        if t is None:
            return {}
        return dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))

    def labels_table(self) -> pa.Table:
        """The labels table (id, label, source, time) plus the image path."""
        return self.storage.read_with_paths("labels")

    def classes(self) -> list[str]:
        """Classes in use (every label value), sorted."""
        return sorted(set(self.labels(source=None).values()))

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels(source=None).values()).items()))


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
