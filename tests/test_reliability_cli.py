"""Issue 13, CLI / library: bad input found by trying gives one line on stderr (exit code 2, no traceback),
nothing is dropped silently, and a failed first add leaves no store behind. Real stores, real files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import embedstore
from embedstore.cli.app import app
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.ingest.backbones.offline import packaged_weights_path

from conftest import TINY_CLIP

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, repr(err)
    for f in fragments:
        assert f in err, err
    assert res.stdout == ""
    return err


def console_script(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("embedstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "embedstore.cli.app"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def stderr_is_one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def few_photos(photo_dir, tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for p in sorted(photo_dir.rglob("*.jpg"))[::20]:  # 4 images of 4 photos
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def huge_pngs(tmp_path_factory) -> dict[str, Path]:
    """A 20000x20000 1-bit PNG (a decompression bomb, 48 KB) and a 12000x12000 one (over the limit, under 2x)."""
    d = tmp_path_factory.mktemp("huge")
    out = {}
    for name, side in (("bomb", 20000), ("big", 12000)):
        out[name] = d / f"{name}.png"
        Image.new("1", (side, side)).save(out[name])
    return out


# ---- 1: k ---------------------------------------------------------------------------------------
def test_absurd_k_is_capped_and_bad_k_is_one_line(photo_store):
    root = photo_store.root
    res = invoke("search", root, "--id", 3, "-k", 99_999_999_999, "--json")  # was: tries to allocate 373 GiB
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 79  # every other image, no more
    for bad in ("0", "-1", "abc", "2.5", ""):
        one_line_error(invoke("search", root, "--id", 3, "-k", bad), "k must")
    ids, _, X = photo_store.vectors()
    S, I = photo_store.search_vectors(X[:2], k=10**11)
    assert I.shape == S.shape == (2, 80) and (I >= 0).all()
    assert len(photo_store.search(id=int(ids[0]), k=10**11, where="size > 0")) == 79
    assert photo_store.duplicates(threshold=0.999, k=10**11) == []
    for bad in (0, float("inf"), float("nan"), 2.5, "many", True):
        with pytest.raises(InvalidArgumentError, match="k must"):
            photo_store.search(id=0, k=bad)


# ---- 2, 8: huge images --------------------------------------------------------------------------
def test_search_by_a_decompression_bomb_is_one_line(photo_store_path, huge_pngs):
    one_line_error(invoke("search", photo_store_path, "--image", huge_pngs["bomb"]), "cannot read query image",
                   "MAX_IMAGE_PIXELS")
    with warnings.catch_warnings(record=True) as seen:  # Pillow's DecompressionBombWarning used to come first
        res = invoke("search", photo_store_path, "--image", huge_pngs["big"])
    one_line_error(res, "12000x12000", "MAX_IMAGE_PIXELS")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.slow
def test_huge_png_query_prints_one_line_in_a_real_process(photo_store_path, huge_pngs):
    r = console_script("search", photo_store_path, "--image", huge_pngs["big"])
    stderr_is_one_error_line(r, "12000x12000")


# ---- 6: a moved --weights file ------------------------------------------------------------------
def test_moved_weights_file_is_found_again_with_weights(few_photos, photo_dir, tmp_path):
    w1, w2 = tmp_path / "w1.pth", tmp_path / "moved" / "w2.pth"
    shutil.copy(packaged_weights_path(), w1)
    store = tmp_path / "w.es"
    assert invoke("add", store, few_photos, "--weights", w1, "--json").exit_code == 0
    w2.parent.mkdir()
    shutil.move(w1, w2)
    query = sorted(photo_dir.rglob("*.jpg"))[1]
    for args in (("add", store, query.parent), ("search", store, "--image", query)):
        one_line_error(invoke(*args), str(w1), "--weights NEW_PATH")
    err = one_line_error(invoke("add", store, few_photos, "--weights", ROOT / "pyproject.toml"), "holds vectors of")
    assert "sha256:" in err  # other weights: the digests are shown, not used

    res = invoke("search", store, "--image", query, "--weights", w2, "--json", "-k", 1)
    assert res.exit_code == 0, res.output
    manifest = json.loads((store / "manifest.json").read_text())
    assert [v["weights"] for v in manifest["versions"].values()] == [str(w2)]
    res = invoke("add", store, query.parent, "--json")  # the new path is used from now on, no --weights needed
    assert res.exit_code == 0, res.output
    info = json.loads(invoke("info", store, "--json").stdout)
    assert info["images"] == info["vectors"] == 13 and info["weights"] == str(w2)  # 4 + the folder's 9 others


# ---- 7: a failed first add ----------------------------------------------------------------------
def test_failed_first_add_creates_no_store(few_photos, tmp_path):
    store = tmp_path / "new.es"
    one_line_error(invoke("add", store, tmp_path / "typo"), f"not found: {tmp_path / 'typo'}")
    assert not store.exists()
    (tmp_path / "empty").mkdir()
    one_line_error(invoke("add", store, tmp_path / "empty"), "no image files found")
    assert not store.exists()
    with pytest.raises(EmptyInputError, match="not found"):  # the library flow, not only the CLI
        embedstore.open(store).add([tmp_path / "typo"], progress=False)
    assert not store.exists()
    kept = tmp_path / "mine.es"  # an empty folder the user made stays, empty
    kept.mkdir()
    with pytest.raises(EmptyInputError):
        embedstore.open(kept).add([tmp_path / "typo"], progress=False)
    assert kept.is_dir() and not any(kept.iterdir())
    used = embedstore.open(tmp_path / "used.es")  # only a first add takes the store back
    used.add([few_photos], progress=False)
    assert used.remove([few_photos]).removed == 4
    with pytest.raises(EmptyInputError):
        used.add([tmp_path / "typo"], progress=False)
    assert embedstore.open(tmp_path / "used.es", create=False).info().images == 0

    res = invoke("add", store, few_photos, "--backbone", TINY_CLIP, "--json")  # the retry picks another backbone
    assert res.exit_code == 0, res.output
    assert json.loads(invoke("info", store, "--json").stdout)["backbone"] == TINY_CLIP


# ---- 8: one line on stderr ----------------------------------------------------------------------
def test_random_bytes_weights_give_no_pytorch_advice(few_photos, tmp_path):
    rand = tmp_path / "rand.pt"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    err = one_line_error(invoke("add", tmp_path / "r.es", few_photos, "--weights", rand), "cannot read checkpoint")
    assert "weights_only" not in err
    assert not (tmp_path / "r.es").exists()


def test_gpu_hint_names_the_extra(photo_store_path):
    from embedstore.search import faiss_index as fx

    if fx.gpu_available():
        pytest.skip("FAISS sees a GPU here")
    one_line_error(invoke("index", photo_store_path, "--gpu"), "pip install 'embedstore[gpu]'")


def test_open_clip_download_failure_is_one_line(few_photos, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no download, even where the network is up
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache: the weights are missing
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # unconfigured, as in an `embedstore` process (pytest adds its own)
    res = invoke("add", tmp_path / "oc.es", few_photos, "--backbone", "openclip:ViT-B-32/laion2b_s34b_b79k")
    one_line_error(res, "could not load weights for openclip:ViT-B-32/laion2b_s34b_b79k", "--weights FILE")
    assert root.handlers == []  # open_clip's logging.error configured nothing behind our back
    assert not (tmp_path / "oc.es").exists()


@pytest.mark.slow
def test_open_clip_download_failure_prints_one_line_in_a_real_process(few_photos, tmp_path):
    hf_home = tmp_path / "hf"  # an empty cache, offline: the download fails at once
    r = console_script("add", tmp_path / "oc.es", few_photos, "--backbone", "openclip:ViT-B-32/laion2b_s34b_b79k",
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    stderr_is_one_error_line(r, "could not load weights", "--weights FILE")
    assert not (tmp_path / "oc.es").exists()


# ---- 9: nothing dropped silently ----------------------------------------------------------------
def test_empty_backbone_name_is_an_error(few_photos, photo_store_path, tmp_path):
    one_line_error(invoke("add", tmp_path / "b.es", few_photos, "--backbone", ""), "empty backbone name")
    assert not (tmp_path / "b.es").exists()
    one_line_error(invoke("add", photo_store_path, few_photos, "--backbone", "", "--json"), "empty backbone name")


def test_csv_rows_with_empty_fields_are_counted(photo_store, photo_labels, tmp_path):
    paths = sorted(photo_labels)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + f"{paths[0]},cat\n{paths[1]},\n,dog\n{paths[2]},  \n\n{paths[3]},cat\n")
    res = photo_store.label_csv(csv)
    assert res.labeled == 2 and res.skipped_rows == 3 and res.to_dict()["skipped_rows"] == 3
    out = invoke("label", photo_store.root, "--csv", csv)
    assert out.exit_code == 0 and "skipped 3 CSV row(s)" in out.stdout, out.output


def test_where_with_a_semicolon_or_trailing_text_is_refused(photo_store):
    for expr in ("size > 0; DROP TABLE images", "size > 0;", "size > 0 id < 5", "label = 'cat' foo"):
        one_line_error(invoke("search", photo_store.root, "--id", 0, "--where", expr), "bad --where expression")
        with pytest.raises(InvalidArgumentError, match="bad --where"):
            photo_store.search(id=0, where=expr)
    assert len(photo_store.search(id=0, k=100, where="path LIKE '%;%' OR size > 0")) == 79  # ';' in a string is fine


def test_label_dropped_by_changed_bytes_is_reported(few_photos, photo_dir, tmp_path):
    s = embedstore.open(tmp_path / "c.es")
    s.add([few_photos], progress=False)
    files = sorted(few_photos.iterdir())
    s.label([files[0]], "cat")
    other = sorted(photo_dir.rglob("*.jpg"))[5]  # new bytes at the same path
    shutil.copy(other, files[0])
    res = s.add([few_photos], progress=False)
    assert res.replaced == 1 and res.labels_dropped == [str(files[0].resolve())]
    assert s.labels() == {}
    shutil.copy(sorted(photo_dir.rglob("*.jpg"))[6], files[0])
    out = invoke("add", s.root, few_photos)
    assert out.exit_code == 0 and "label dropped" not in out.stdout  # no label this time, no warning
    s.label([files[1]], "dog")
    shutil.copy(sorted(photo_dir.rglob("*.jpg"))[7], files[1])
    out = invoke("add", s.root, few_photos)
    assert out.exit_code == 0 and "1 label(s) dropped" in out.stdout and files[1].name in out.stdout, out.output


def test_classify_says_how_many_images_had_no_vector(photo_store, photo_labels):
    s = photo_store
    ids, paths, _ = s.vectors()
    for i in (0, 1, 10, 11, 20, 21):  # 3 classes, 2 labels each
        s.label([paths[i]], photo_labels[paths[i]])
    s.storage.delete_ids(f"vectors_{s.active_version}", ids[-3:])  # as after a kill between the two commits
    res = s.classify(head="knn")
    assert res.skipped == 3 and "no vector" in res.skipped_reason and len(res.predictions) == 80 - 6 - 3
    assert res.to_dict()["skipped"] == 3
    out = invoke("classify", s.root, "--head", "knn", "--json")
    assert out.exit_code == 0 and len(json.loads(out.stdout)) == 71
    assert "3 image(s) have no vector" in out.stderr


def test_remove_command(photo_store, photo_dir):
    root = photo_store.root
    folder = sorted(p for p in photo_dir.iterdir() if p.is_dir())[0]  # 10 images
    one_file = sorted(sorted(p for p in photo_dir.iterdir() if p.is_dir())[1].glob("*.jpg"))[0]
    res = invoke("remove", root, folder, one_file, "nope.jpg", "--ids", "75,9999", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["removed"] == 12 and sorted(d["unknown"]) == ["9999", "nope.jpg"] and d["unknown_count"] == 2
    assert json.loads(invoke("info", root, "--json").stdout)["images"] == 68
    human = invoke("remove", root, "--ids", "76")
    assert human.exit_code == 0 and "removed 1 images" in human.stdout
    one_line_error(invoke("remove", root, "--ids", "9999"), "none of the 1 item(s) is in the store")
    one_line_error(invoke("remove", root), "nothing to remove")
    r = embedstore.open(root, create=False).remove(ids=[77], paths=["gone.jpg"])
    assert (r.removed, r.unknown) == (1, ["gone.jpg"])


# ---- 10: the demo ---------------------------------------------------------------------------------
def test_demo_images_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("demo-images/photos/x.jpg", "demo.es/manifest.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


@pytest.mark.slow
def test_demo_rerun_keeps_labels_it_did_not_make(tmp_path, photo_dir):
    store = tmp_path / "demo.es"
    assert invoke("demo", store, "--json").exit_code == 0
    assert invoke("demo", store, "--json").exit_code == 0  # nothing added since: rebuilt
    s = embedstore.open(store, create=False)
    extra = sorted((tmp_path / "demo-images" / "photos").rglob("*.jpg"))[-1]
    s.label([extra], "my-own-class")
    one_line_error(invoke("demo", store), "1 label(s)", "--force")
    assert embedstore.open(store, create=False).labels().get(s.resolve_items([extra])[0][0]) == "my-own-class"
    res = invoke("demo", store, "--force", "--json")
    assert res.exit_code == 0, res.output
    assert "my-own-class" not in embedstore.open(store, create=False).classes()


def test_16bit_greyscale_png_decodes_like_its_8bit_twin(tmp_path):
    """A 16-bit PNG (mode I;16) must not turn white: Pillow's convert('RGB') clips such values at 255."""
    import numpy as np
    from PIL import Image

    from embedstore.ingest.images import load_image

    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(ramp, "L").save(tmp_path / "g8.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a8 = np.asarray(load_image(str(tmp_path / "g8.png")), np.int16)
    a16 = np.asarray(load_image(str(tmp_path / "g16.png")), np.int16)
    assert a16.shape == a8.shape and np.abs(a16 - a8).max() <= 1
