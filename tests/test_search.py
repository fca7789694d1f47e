"""Search over real stores: queries, index freshness after add/remove, rebuilds, filters, text, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

import embedstore
from embedstore.search import faiss_index as fx
from embedstore.search import search as search_mod
from embedstore.cli.app import app
from embedstore.errors import EmptyInputError, InvalidArgumentError, NotSupportedError
from embedstore.results import Hit

from conftest import TINY_CLIP


def _index_files(store):
    p = store.root / "index" / f"{store.active_version}.faiss"
    return p, fx.sidecar_path(p)


def _meta(store) -> dict:
    return json.loads(_index_files(store)[1].read_text())


def _class_of(path: str) -> str:
    return Path(path).parent.name


def _new_images(src_dir: Path, out: Path, n: int) -> list[str]:
    """n new images (mirrored + re-encoded views of stored ones): new content, so new ids."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(sorted(src_dir.rglob("*.jpg"))[:: 80 // n][:n]):
        q = out / f"new_{i}.png"
        ImageOps.mirror(Image.open(p).convert("RGB")).rotate(7).save(q)
        paths.append(str(q.resolve()))
    return paths


# ---- queries ------------------------------------------------------------------------------
def test_stored_image_as_query_returns_itself_first(photo_store):
    ids, paths, _ = photo_store.vectors()
    for i in (0, 37, 79):
        hits = photo_store.search(image=paths[i], k=5)
        assert hits[0].id == ids[i] and hits[0].path == paths[i]
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        # the real weights put views of the same photo next to each other
        assert sum(_class_of(h.path) == _class_of(paths[i]) for h in hits) >= 4
    assert _index_files(photo_store)[0].is_file()
    assert photo_store.info().index.factory == "Flat"


def test_id_vector_and_batch_queries(photo_store):
    ids, paths, X = photo_store.vectors()
    hits = photo_store.search(id=int(ids[5]), k=10)
    assert len(hits) == 10 and ids[5] not in [h.id for h in hits]  # the query itself is left out
    assert isinstance(hits[0], Hit) and set(hits[0].to_dict()) == {"id", "path", "score", "label", "prediction"}
    by_vec = photo_store.search(vector=X[5] * 3.0, k=3)  # scaled: normalised before searching
    assert by_vec[0].id == ids[5]
    S, I = photo_store.search_vectors(X[:20], k=4)
    assert S.shape == I.shape == (20, 4) and S.dtype == np.float32 and I.dtype == np.int64
    np.testing.assert_array_equal(I[:, 0], ids[:20])
    S, I = photo_store.search_vectors(X[:2], k=200)  # more than stored: padded with -1
    assert (I[:, 80:] == -1).all() and (I[:, :80] >= 0).all()


def test_bad_queries_raise_one_line_errors(photo_store, tmp_path):
    cases = [
        (dict(), InvalidArgumentError, "exactly one query"),
        (dict(id=0, text="x"), InvalidArgumentError, "exactly one query"),
        (dict(id=10_000), InvalidArgumentError, "no image with id 10000"),
        (dict(id=0, k=0), InvalidArgumentError, "k must be"),
        (dict(image=tmp_path / "nope.jpg"), InvalidArgumentError, "not found"),
        (dict(vector=np.ones(7)), InvalidArgumentError, "7 values"),
        (dict(text="a cat"), NotSupportedError, "openclip"),
    ]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    cases.append((dict(image=tmp_path / "bad.jpg"), InvalidArgumentError, "cannot read"))
    for kw, exc, text in cases:
        with pytest.raises(exc, match=text) as e:
            photo_store.search(**kw)
        assert "\n" not in str(e.value), kw
    with pytest.raises(InvalidArgumentError, match=r"shape \(N, "):
        photo_store.search_vectors(np.zeros((3, 5), np.float32))


# ---- freshness ------------------------------------------------------------------------------
def test_added_images_searchable_at_once_and_removed_never_return(photo_store, photo_dir, tmp_path):
    s = photo_store
    s.search(id=0, k=3)
    built = _meta(s)["built"]
    new = _new_images(photo_dir, tmp_path / "new", 4)
    s.add(new, progress=False)
    m = _meta(s)
    assert m["built"] == built and m["n"] == 84  # updated in place, not rebuilt
    assert m["lance_version"] == s.storage.vectors_table().version and s.info().index.fresh
    for p in new:
        assert s.search(image=p, k=1)[0].path == p

    ids, paths, X = s.vectors()
    gone = [int(i) for i, p in zip(ids, paths) if p in new[:2]] + [int(ids[0]), int(ids[1])]
    s.remove(ids=gone)
    assert _meta(s)["n"] == 80
    _, I = s.search_vectors(X, k=84)
    assert not np.isin(I, gone).any()
    assert not {h.id for h in s.search(vector=X[0], k=84)} & set(gone)
    # a fresh process (new Store object) reads the updated file and agrees
    s2 = embedstore.open(s.root, create=False)
    _, I2 = s2.search_vectors(X, k=84)
    assert not np.isin(I2, gone).any() and (I2 >= 0).sum() == 84 * 80


def test_hnsw_deletions_are_filtered_and_persisted(photo_store):
    s = photo_store
    d = s.build_index(factory="HNSW16,Flat", progress=False)
    assert d.kind == "hnsw" and d.vectors == 80 and not d.auto
    ids, _, X = s.vectors()
    s.remove(ids=[int(ids[3]), int(ids[4])])
    m = _meta(s)
    assert sorted(m["deleted"]) == sorted([int(ids[3]), int(ids[4])]) and m["factory"] == "HNSW16,Flat"
    for store in (s, embedstore.open(s.root, create=False)):
        S, I = store.search_vectors(X[3:5], k=10)
        assert not np.isin(I, ids[3:5]).any() and (I >= 0).all()
        assert store.info().index.vectors == 78


def test_changes_from_another_process_are_seen(photo_store, photo_dir, tmp_path):
    s = photo_store
    s.search(id=0, k=1)
    other = embedstore.open(s.root, create=False)  # another writer
    new = _new_images(photo_dir, tmp_path / "other", 2)
    other.add(new, progress=False)
    other.remove(ids=[7])
    ids, paths, X = other.vectors()
    _, I = s.search_vectors(X, k=90)  # s never saw these changes happen
    np.testing.assert_array_equal(I[:, 0], ids)
    assert 7 not in I and {p for p in paths} >= set(new)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "sidecar", "stale"])
def test_missing_corrupt_or_stale_index_is_rebuilt(photo_store, damage):
    s = photo_store
    ids, paths, _ = s.vectors()
    s.build_index(progress=False)
    path, side = _index_files(s)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x07" * path.stat().st_size)
    elif damage == "sidecar":
        side.write_text("{")
    else:  # sidecar says an older table version and misses ids: the index catches up
        m = json.loads(side.read_text())
        m["lance_version"] = 1
        side.write_text(json.dumps(m))
    fresh = embedstore.open(s.root, create=False)
    assert fresh.search(image=paths[9], k=1)[0].id == ids[9]
    index, meta = fx.load(path, s.version_info()["dim"])  # rewritten, valid, matching the table
    assert index.ntotal == 80 and meta["lance_version"] == fresh.storage.vectors_table().version
    if damage != "stale":
        assert meta["reason"] == "missing" and meta["problem"]


def test_empty_store_and_growth_switches_index_type(photo_store, monkeypatch):
    s = photo_store
    monkeypatch.setattr(fx, "FLAT_MAX", 50)  # pretend 80 images is a big store
    monkeypatch.setattr(fx, "HNSW_MAX", 10_000)
    ids, _, X = s.vectors()
    s.remove(ids=ids[60:].tolist())
    assert s.build_index(progress=False).factory == "HNSW32,Flat"
    s.remove(ids=ids[:59].tolist())  # 1 left: auto choice falls back to exact
    assert s.search_vectors(X[59], k=3)[1][0].tolist() == [ids[59], -1, -1]
    assert _meta(s)["factory"] == "Flat"
    s.remove(ids=[int(ids[59])])
    with pytest.raises(EmptyInputError, match="add images first"):
        s.search(id=0)


# ---- filters ------------------------------------------------------------------------------
@pytest.fixture()
def labeled_store(photo_store):
    ids, paths, _ = photo_store.vectors()
    photo_store.label([p for p in paths if _class_of(p) == "astronaut"], "person")
    photo_store.label([p for p in paths if _class_of(p) == "chelsea"], "cat")
    return photo_store


def test_where_filters_return_k_matching_hits(labeled_store):
    s = labeled_store
    ids, paths, X = s.vectors()
    q = X[[_class_of(p) for p in paths].index("rocket")]  # a query far from the filtered class
    hits = s.search(vector=q, k=5, where="label = 'cat'")
    assert len(hits) == 5 and all(h.label == "cat" and _class_of(h.path) == "chelsea" for h in hits)
    assert len(s.search(vector=q, k=50, where="label = 'cat'")) == 10  # every match, no more
    hits = s.search(vector=q, k=30, where="label IS NULL AND path LIKE '%coffee%'")
    assert len(hits) == 10 and all(_class_of(h.path) == "coffee" and h.label is None for h in hits)
    assert len(s.search(vector=q, k=7, where="prediction IS NULL AND size > 0")) == 7  # no predictions table yet
    assert s.search(vector=q, k=5, where="label = 'dog'") == []
    hits = s.search(id=int(ids[0]), k=9, where="label = 'person'")  # stored id: itself left out
    assert len(hits) == 9 and ids[0] not in [h.id for h in hits]


def test_where_with_ann_index_selector_path(labeled_store, monkeypatch):
    s = labeled_store
    monkeypatch.setattr(search_mod, "EXACT_FILTER_MAX", 0)  # force the FAISS IDSelector path
    s.build_index(factory="IVF8,Flat", progress=False)
    _, paths, X = s.vectors()
    q = X[[_class_of(p) for p in paths].index("rocket")]
    hits = s.search(vector=q, k=8, where="label = 'cat' OR label = 'person'")
    assert len(hits) == 8 and {h.label for h in hits} <= {"cat", "person"}
    s.remove(ids=[h.id for h in hits[:3]])
    hits2 = s.search(vector=q, k=20, where="label = 'cat' OR label = 'person'")
    assert len(hits2) == 17 and not {h.id for h in hits[:3]} & {h.id for h in hits2}


def test_bad_where_is_one_line(labeled_store):
    for expr in ("label = = 'x'", "colour = 'red'"):
        with pytest.raises(InvalidArgumentError, match="bad --where expression") as e:
            labeled_store.search(id=0, where=expr)
        assert "\n" not in str(e.value)


# ---- duplicates ---------------------------------------------------------------------------
def test_duplicates_finds_a_resized_copy(photo_store, tmp_path):
    s = photo_store
    ids, paths, _ = s.vectors()
    copy = tmp_path / "copy.png"
    Image.open(paths[12]).resize((230, 230)).save(copy)
    s.add([copy], progress=False)
    pairs = s.duplicates(threshold=0.9)
    assert pairs and pairs[0].score >= 0.9
    assert {(p.path_a, p.path_b) for p in pairs} & {(paths[12], str(copy.resolve()))}
    assert [p.score for p in pairs] == sorted((p.score for p in pairs), reverse=True)
    assert all(p.id_a < p.id_b for p in pairs)
    with pytest.raises(InvalidArgumentError, match="threshold"):
        s.duplicates(threshold=1.5)


# ---- text ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_store(tmp_path_factory, photo_dir):
    files = sorted(photo_dir.rglob("*.jpg"))[::10]  # 8 images, one per photo
    store = embedstore.open(tmp_path_factory.mktemp("clip") / "clip.es", backbone=TINY_CLIP)
    store.add(files, progress=False)
    return store


def test_text_search_with_open_clip(clip_store):
    hits = clip_store.search(text="a photo of a cat", k=5)
    ids = set(clip_store.vectors().ids.tolist())
    assert len(hits) == 5 and {h.id for h in hits} <= ids
    assert all(-1.0 <= h.score <= 1.0 for h in hits)
    q = clip_store.backbone.embed_texts(["a photo of a cat"])
    assert [h.id for h in hits] == [h.id for h in clip_store.search(vector=q[0], k=5)]


# ---- GPU ----------------------------------------------------------------------------------
def test_gpu_flag(photo_store):
    if fx.gpu_available():
        d = photo_store.build_index(factory="IVF4,Flat", gpu=True, progress=False)
        assert d.gpu
        _, paths, _ = photo_store.vectors()
        assert photo_store.search(image=paths[0], k=1)[0].path == paths[0]
    else:
        with pytest.raises(NotSupportedError, match="no GPU"):
            photo_store.build_index(gpu=True)
        assert photo_store.build_index(gpu=None, progress=False).gpu is False


# ---- CLI ----------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_json_shapes(photo_store):
    root = photo_store.root
    r = _cli("search", root, "--id", 3, "-k", 5, "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert len(hits) == 5 and all(set(h) == {"id", "path", "score"} for h in hits)
    _, paths, _ = photo_store.vectors()
    r = _cli("search", root, "--image", paths[0], "-k", 2, "--where", "size > 0", "--json")
    assert json.loads(r.stdout)[0]["path"] == paths[0]
    r = _cli("index", root, "--factory", "HNSW16,Flat", "--json")
    d = json.loads(r.stdout)
    assert d["factory"] == "HNSW16,Flat" and d["vectors"] == 80 and "recall_at_10" in d
    r = _cli("duplicates", root, "--threshold", 0.99, "--json")
    assert r.exit_code == 0 and isinstance(json.loads(r.stdout), list)
    r = _cli("search", root, "--id", 3, "-k", 3)
    assert r.exit_code == 0 and "score" in r.stdout and "path" in r.stdout


@pytest.mark.parametrize(
    "args, text",
    [
        (["search", "{root}"], "exactly one query"),
        (["search", "{root}", "--text", "a cat"], "no text tower"),
        (["search", "{root}", "--id", "0", "--where", "nope = 1"], "bad --where"),
        (["index", "{root}", "--factory", "Bogus"], "bad FAISS factory"),
        (["duplicates", "{root}", "--threshold", "0"], "threshold"),
        (["search", "{root}/missing.es", "--id", "0"], "no store"),
    ],
)
def test_cli_errors_are_one_line(photo_store_path, tmp_path, args, text):
    root = tmp_path / "s.es"
    shutil.copytree(photo_store_path, root)
    r = _cli(*[a.format(root=root) for a in args])
    assert r.exit_code == 2, r.output
    assert text in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
