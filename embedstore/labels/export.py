"""Export labels and predictions: CSV, JSON, or an ImageFolder tree (OUT/<class>/<file>).

One row per image that has a label or a prediction: id, path, label, source (human | model for
labels, prediction for the classifier's output), confidence and head (predictions only). An abstained
prediction has label None; it is in CSV/JSON (as an empty / null label) and left out of the ImageFolder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from embedstore.errors import InvalidArgumentError
from embedstore.results import ExportResult

FORMATS = ("csv", "json", "imagefolder")
INCLUDE = ("all", "labels", "predictions")
COLUMNS = ("id", "path", "label", "source", "confidence", "head")


def export_rows(clf, include: str = "all") -> list[dict]:
    """Labeled images first-class, then predictions for images without a label; sorted by id."""
    if include not in INCLUDE:
        raise InvalidArgumentError(f"unknown include {include!r}; use one of {', '.join(INCLUDE)}")
    rows: dict[int, dict] = {}
    if include in ("all", "predictions"):
        for r in clf.predictions().to_pylist():
            rows[r["id"]] = {
                "id": r["id"],
                "path": r["path"],
                "label": r["label"],
                "source": "prediction",
                "confidence": round(float(r["confidence"]), 4),
                "head": r["head"],
            }
    if include in ("all", "labels"):
        for r in clf.labels.labels_table().to_pylist():
            rows[r["id"]] = {"id": r["id"], "path": r["path"], "label": r["label"], "source": r["source"], "confidence": None, "head": None}
    return [rows[i] for i in sorted(rows)]


def export(
    clf, fmt: str, out: str | os.PathLike, include: str = "all", link: bool = False, overwrite: bool = False
) -> ExportResult:
    """Write the export (csv, json or imagefolder)."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    rows = export_rows(clf, include)
    if not rows:
        raise InvalidArgumentError("nothing to export: no labels or predictions yet; run embedstore label / classify first")
    out = Path(out).expanduser().resolve()
    per_class = dict(sorted(Counter(r["label"] for r in rows if r["label"] is not None).items()))
    res = ExportResult(fmt, str(out), len(rows), per_class, sum(r["label"] is None for r in rows))
    if fmt == "csv":
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    elif fmt == "json":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    else:
        res.files, res.missing = _imagefolder(rows, out, link, overwrite)
        res.linked = link
    return res


def _imagefolder(rows: list[dict], out: Path, link: bool, overwrite: bool) -> tuple[int, list[str]]:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise InvalidArgumentError(f"{out} exists and is not an empty folder; pick a new folder or pass --overwrite")
    files, missing = 0, []
    taken: set[Path] = set()
    for r in rows:
        if r["label"] is None:
            continue
        src = Path(r["path"])
        if not src.is_file():
            missing.append(str(src))
            continue
        d = out / r["label"]
        d.mkdir(parents=True, exist_ok=True)
        dst = d / src.name
        if dst in taken or (dst.exists() and not overwrite):
            dst = d / f"{src.stem}_{r['id']}{src.suffix}"
        taken.add(dst)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        os.symlink(src, dst) if link else shutil.copy2(src, dst)
        files += 1
    return files, missing
