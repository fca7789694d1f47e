"""The Streamlit UI, driven page by page with streamlit.testing.v1.AppTest on a real store (real weights)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the UI extra is not installed: pip install 'embedstore[ui]'")

from streamlit.testing.v1 import AppTest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import embedstore  # noqa: E402
from embedstore.cli.app import app as cli_app  # noqa: E402
from embedstore.ui import APP_PATH, thumbs  # noqa: E402
from embedstore.ui.common import NEW_CLASS  # noqa: E402


def open_app(store, monkeypatch, page: str | None = None) -> AppTest:
    monkeypatch.setenv("EMBEDSTORE_STORE", str(store.root))
    at = AppTest.from_file(str(APP_PATH), default_timeout=180)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.sidebar.radio(key="nav").set_value(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def ids_by_path(store) -> dict[str, int]:
    t = store.storage.read_table("images", ["id", "path"])
    return dict(zip(t.column("path").to_pylist(), t.column("id").to_pylist()))


def captions(at) -> list[str]:
    return [c for img in at.image for c in img.captions]


def fresh(store):
    return embedstore.open(store.root, create=False)


def test_search_upload_returns_the_query_image_first(photo_store, monkeypatch):
    at = open_app(photo_store, monkeypatch)
    path, iid = sorted(ids_by_path(photo_store).items())[5]
    at.file_uploader(key="search_upload").set_value((Path(path).name, Path(path).read_bytes(), "image/jpeg")).run()
    assert not at.exception, [e.value for e in at.exception]
    results = [c for c in captions(at) if c[:1].isdigit()]  # result captions start with the score
    assert len(results) == 24
    score, rest = results[0].split(" · ", 1)
    assert rest.split()[0] == f"#{iid}" and float(score) > 0.99


def test_search_similar_button_and_label_filter(photo_store, monkeypatch):
    ids = ids_by_path(photo_store)
    cat = sorted(i for p, i in ids.items() if "/chelsea/" in p)
    photo_store.label(cat[:3], "cat")
    at = open_app(photo_store, monkeypatch)
    at.button(key=f"browse_nb_{cat[0]}").click().run()  # "similar" under a thumbnail
    assert not at.exception
    results = [c for c in captions(at) if c[:1].isdigit()]
    assert len(results) == 24 and all(f"#{cat[0]} " not in c for c in results)  # its own image is left out
    top = [int(c.split("#")[1].split()[0]) for c in results[:5]]
    assert set(top) <= set(cat), results[:5]  # its nearest neighbours are other views of the same photo
    at.multiselect(key="search_f_label").set_value(["cat"]).run()
    results = [c for c in captions(at) if c[:1].isdigit()]
    assert sorted(int(c.split("#")[1].split()[0]) for c in results) == sorted(cat[1:3])
    assert all("✓ cat" in c for c in results)


def test_labeling_writes_label_rows(photo_store, monkeypatch):
    at = open_app(photo_store, monkeypatch, "Label")
    boxes = [cb for cb in at.checkbox if cb.key and cb.key.startswith("label_sel_")]
    assert len(boxes) >= 6
    chosen = [int(cb.key.rsplit("_", 1)[1]) for cb in boxes[:3]]
    for cb in boxes[:3]:
        cb.check()
    at.selectbox(key="label_cls").set_value(NEW_CLASS).run()
    at.text_input(key="label_newcls").input("zebra").run()
    at.button(key="label_save").click().run()
    assert not at.exception, [e.value for e in at.exception]
    lt = fresh(photo_store).labels_table().to_pylist()
    assert sorted(r["id"] for r in lt if r["label"] == "zebra") == sorted(chosen)
    assert all(r["source"] == "human" for r in lt)
    assert any("labeled 3 image(s)" in s.value for s in at.success)


def _two_classes(store) -> tuple[list[int], list[int]]:
    ids = ids_by_path(store)
    a = sorted(i for p, i in ids.items() if "/astronaut/" in p)
    b = sorted(i for p, i in ids.items() if "/coffee/" in p)
    store.label(a[:3], "astronaut")
    store.label(b[:3], "coffee")
    store.classify(head="knn")
    return a, b


def test_review_correction_changes_the_label(photo_store, monkeypatch):
    a, b = _two_classes(photo_store)
    at = open_app(photo_store, monkeypatch, "Review")
    at.selectbox(key="review_class").set_value("astronaut").run()
    boxes = [cb for cb in at.checkbox if cb.key and cb.key.startswith("review_sel_")]
    assert boxes, "the astronaut bucket is empty"
    target = int(boxes[0].key.rsplit("_", 1)[1])
    boxes[0].check()
    at.selectbox(key="review_cls").set_value("coffee").run()
    at.button(key="review_correct").click().run()
    assert not at.exception, [e.value for e in at.exception]
    s = fresh(photo_store)
    assert s.labels()[target] == "coffee"
    assert target not in set(s.predictions().column("id").to_pylist())  # predictions refreshed: now labeled
    at.run()
    shown = [c.value for c in at.caption if c.value.startswith("predicted by")]
    assert shown and "auto" in shown[0], [c.value for c in at.caption]  # the refresh ran auto; it says why


def test_review_accept_and_why(photo_store, monkeypatch):
    a, _ = _two_classes(photo_store)
    at = open_app(photo_store, monkeypatch, "Review")
    at.selectbox(key="review_class").set_value("astronaut").run()
    boxes = [cb for cb in at.checkbox if cb.key and cb.key.startswith("review_sel_")]
    first = int(boxes[0].key.rsplit("_", 1)[1])
    at.button(key=f"review_x_{first}").click().run()  # "why": the nearest labeled examples
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"Why image #{first}" in h.value for h in at.subheader)
    evidence = [c for c in captions(at) if "✓" in c]
    assert len(evidence) == 6 and all(c.split("✓ ")[1] in ("astronaut", "coffee") for c in evidence)
    boxes = [cb for cb in at.checkbox if cb.key and cb.key.startswith("review_sel_")]  # the page changed
    for cb in boxes[:2]:
        cb.check()
    at.run()
    at.button(key="review_accept").click().run()
    assert not at.exception
    labels = fresh(photo_store).labels()
    assert all(labels[int(cb.key.rsplit("_", 1)[1])] == "astronaut" for cb in boxes[:2])


def test_review_evaluation_shows_the_estimate_for_the_unlabeled_images(photo_store, monkeypatch):
    ids = ids_by_path(photo_store)
    for cls in ("astronaut", "coffee"):
        photo_store.label(sorted(i for p, i in ids.items() if f"/{cls}/" in p)[:6], cls)
    at = open_app(photo_store, monkeypatch, "Review")
    assert any("no evaluation yet" in c.value for c in at.caption)
    at.button(key="review_eval").click().run()
    assert not at.exception, [e.value for e in at.exception]
    run = fresh(photo_store).eval_history()[-1]
    est = run.unlabeled_estimate
    assert est is not None and run.n_labels == 12
    shown = [m.value for m in [*at.info, *at.warning] if "expected on the unlabeled images" in m.value]
    assert shown == [run.estimate_line()] and f"{est['accuracy']:.3f}" in shown[0]
    assert any(c.value.startswith("plateau: no (") for c in at.caption)  # one run: nothing to compare yet


def test_map_and_store_pages_render(photo_store, monkeypatch):
    _two_classes(photo_store)
    at = open_app(photo_store, monkeypatch, "Map")
    charts = at.get("vega_lite_chart")
    assert len(charts) == 1
    at.sidebar.radio(key="nav").set_value("Store").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["images"] == "80" and metrics["labels"] == "6"
    assert len(at.dataframe) >= 1  # the versions table


def test_thumbnails_are_made_once_and_only_for_stored_ids(photo_store):
    ids = sorted(ids_by_path(photo_store).values())[:3]
    first = thumbs.thumbnails(photo_store, ids + [10**9])
    assert first[10**9] is None  # not in the store: nothing is read
    files = [first[i] for i in ids]
    assert all(f is not None and f.parent == photo_store.root / "thumbs" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = thumbs.thumbnails(photo_store, ids)
    assert [again[i].stat().st_mtime_ns for i in ids] == mtimes


def test_ui_command_errors_are_one_line(tmp_path, photo_store_path):
    r = CliRunner().invoke(cli_app, ["ui", str(tmp_path / "nope.es")])
    assert r.exit_code == 2 and "no store at" in r.output and "Traceback" not in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = CliRunner().invoke(cli_app, ["ui", str(photo_store_path), "--port", str(port)])
    assert r.exit_code == 2 and f"127.0.0.1:{port}" in r.output and "--port" in r.output


@pytest.mark.slow  # loads a ViT-B-32 twice (~30 s on 2 cores)
def test_text_search_on_a_clip_store(photo_dir, tmp_path, monkeypatch):
    from conftest import TINY_CLIP

    files = sorted(photo_dir.rglob("*.jpg"))[::10][:6]  # one view of six photos
    store = embedstore.open(tmp_path / "clip.es", backbone=TINY_CLIP)
    store.add(files, progress=False)
    at = open_app(store, monkeypatch)
    at.text_input(key="search_text").input("a photo of a cat").run()
    assert not at.exception, [e.value for e in at.exception]
    results = [c for c in captions(at) if c[:1].isdigit() or c[:1] == "-"]
    assert len(results) == 6  # every image, ranked by its similarity to the text
    assert any("a photo of a cat" in m.value for m in at.markdown)
