"""export: csv, json, imagefolder (copies and symlinks) of labels and predictions."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import pytest

from embedstore.errors import InvalidArgumentError


@pytest.fixture()
def classified(photo_store, photo_labels):
    g = defaultdict(list)
    for p, c in sorted(photo_labels.items()):
        g[c].append(p)
    for c, paths in g.items():
        photo_store.label(paths[:2], c)
    photo_store.classify(head="knn", threshold=0.99)
    return photo_store


def test_export_csv_json(classified, tmp_path):
    res = classified.export("csv", tmp_path / "out.csv")
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert len(rows) == res.rows == 80
    assert set(rows[0]) == {"id", "path", "label", "source", "confidence", "head"}
    assert {r["source"] for r in rows} == {"human", "prediction"}
    assert sum(r["source"] == "human" for r in rows) == 16
    res = classified.export("json", tmp_path / "out.json", include="predictions")
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data) == 64 and all(d["source"] == "prediction" for d in data)
    assert sum(d["label"] is None for d in data) == res.unknown


@pytest.mark.parametrize("link", [False, True])
def test_export_imagefolder(classified, tmp_path, link):
    out = tmp_path / "tree"
    res = classified.export("imagefolder", out, link=link)
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    assert len(files) == res.files == 80 - res.unknown
    assert {p.parent.name for p in files} <= set(classified.classes())
    assert all(p.is_symlink() == link for p in files)
    assert sum(res.per_class.values()) == res.files
    with pytest.raises(InvalidArgumentError, match="not an empty folder"):
        classified.export("imagefolder", out)


def test_export_errors(photo_store, tmp_path):
    with pytest.raises(InvalidArgumentError, match="nothing to export"):
        photo_store.export("csv", tmp_path / "x.csv")
    with pytest.raises(InvalidArgumentError, match="format"):
        photo_store.export("xml", tmp_path / "x.xml")
