"""embedstore.search.faiss_index: automatic choice, recall of each index type against exact search, ids, files."""

from __future__ import annotations

import numpy as np
import pytest

from embedstore.search import faiss_index as fx
from embedstore.errors import InvalidArgumentError

N, D, CLUSTERS = 6000, 48, 150


@pytest.fixture(scope="module")
def data():
    # spread 1.5: neighbours are close enough that IVF with nprobe=1 and HNSW with a small efSearch miss
    X = fx.clustered_vectors(N, D, clusters=CLUSTERS, spread=1.5, seed=0)
    Q = fx.clustered_vectors(300, D, clusters=CLUSTERS, spread=1.5, seed=1)
    ids = 1000 + 7 * np.arange(N, dtype=np.int64)  # not row numbers: results must be image ids
    _, pos = fx.exact_knn(Q, X, 10)
    return X, Q, ids, ids[pos]


@pytest.mark.parametrize("factory, kind", [("Flat", "flat"), ("HNSW32,Flat", "hnsw"), ("IVF64,Flat", "ivf")])
def test_recall_against_exact(data, factory, kind):
    X, Q, ids, truth = data
    index, meta = fx.build(X, ids, factory)
    assert meta["kind"] == kind and meta["n"] == N and index.ntotal == N
    _, found = index.search(Q, 10)
    assert np.isin(found, ids).all()
    recall = fx.recall_at_k(found, truth, 10)
    assert recall >= 0.95, (factory, meta["params"], recall)
    if kind != "flat":  # tuning raised the search parameter above FAISS's default and measured it
        assert meta["recall_at_10"] >= fx.TARGET_RECALL
        untuned = fx.make_index(D, factory)
        assert list(meta["params"].values())[0] > list(fx.default_params(untuned).values())[0]


def test_untuned_ivf_is_worse(data):
    """The data is hard enough that tuning matters (otherwise the recall test proves little)."""
    X, Q, ids, truth = data
    index, _ = fx.build(X, ids, "IVF64,Flat", tune=False)
    fx.set_params(index, {"nprobe": 1})
    _, found = index.search(Q, 10)
    assert fx.recall_at_k(found, truth, 10) < 0.9


def test_choose_factory_by_size():
    assert fx.choose_factory(10) == "Flat"
    assert fx.choose_factory(fx.FLAT_MAX - 1) == "Flat"
    assert fx.choose_factory(fx.FLAT_MAX) == f"HNSW{fx.HNSW_M},Flat"
    assert fx.choose_factory(fx.HNSW_MAX) == f"IVF{fx.ivf_lists(fx.HNSW_MAX)},Flat"
    assert fx.choose_factory(1_000_000) == "IVF1024,Flat"
    assert fx.choose_factory(10_000_000) == "IVF4096,Flat"
    lists = [fx.ivf_lists(n) for n in (10**5, 10**6, 10**7, 10**9)]
    assert lists == sorted(lists) and all(x & (x - 1) == 0 for x in lists)
    assert fx.ivf_lists(10**12) == fx.IVF_MAX_LISTS


def test_bad_factory_and_too_few_vectors(data):
    X, _, ids, _ = data
    with pytest.raises(InvalidArgumentError, match="factory") as e:
        fx.make_index(D, "NotAnIndex,Flat")
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidArgumentError, match="at least 4096 vectors"):
        fx.build(X[:100], ids[:100], "IVF4096,Flat")


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF16,Flat"])
def test_add_remove_and_ids(data, factory):
    X, _, ids, _ = data
    index, _ = fx.build(X[:2000], ids[:2000], factory, tune=False)
    index.add_with_ids(X[2000:2100], ids[2000:2100])
    assert set(fx.index_ids(index)) == set(ids[:2100])
    _, found = index.search(X[2050:2051], 1)
    assert found[0, 0] == ids[2050]
    try:
        index.remove_ids(fx.faiss.IDSelectorBatch(ids[:10]))
    except RuntimeError:
        assert factory.startswith("HNSW")  # HNSW cannot remove; the store filters such ids instead
        return
    assert set(fx.index_ids(index)) == set(ids[10:2100])
    _, found = index.search(X[:10], 1)
    assert not np.isin(found, ids[:10]).any()


def test_save_load_roundtrip_and_corruption(data, tmp_path):
    X, Q, ids, _ = data
    index, meta = fx.build(X, ids, "IVF32,Flat")
    path = tmp_path / "v.faiss"
    written = fx.save(index, meta, path)
    assert fx.sidecar_path(path).is_file() and written["faiss_bytes"] == path.stat().st_size
    loaded, m2 = fx.load(path, D)
    assert m2["params"] == meta["params"] and fx.faiss.extract_index_ivf(loaded).nprobe == meta["params"]["nprobe"]
    np.testing.assert_array_equal(index.search(Q, 5)[1], loaded.search(Q, 5)[1])
    with pytest.raises(fx.IndexFileError):
        fx.load(path, D + 1)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(fx.IndexFileError):
        fx.load(path, D)
    path.write_bytes(b"\0" * len(raw))
    with pytest.raises(fx.IndexFileError):
        fx.load(path, D)
    fx.sidecar_path(path).write_text("{not json")
    with pytest.raises(fx.IndexFileError):
        fx.load(path, D)
    path.unlink()
    fx.sidecar_path(path).unlink()
    with pytest.raises(fx.IndexFileError):
        fx.load(path, D)


def test_clustered_vectors_are_seeded_and_normalised():
    a = fx.clustered_vectors(500, 16, clusters=10, seed=3)
    b = fx.clustered_vectors(500, 16, clusters=10, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert not np.array_equal(a, fx.clustered_vectors(500, 16, clusters=10, seed=4))
