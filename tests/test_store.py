"""The store: content-hash dedup, incremental add, replaced files, bad files, SIGKILL + resume, the write
lock, backbone mismatch, EXIF orientation and vectors(). Real LanceDB directory, real packaged weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lancedb
import numpy as np
import pytest
from PIL import Image

import embedstore
from embedstore.errors import BackboneMismatchError, NoImagesAddedError, StoreLockedError, StoreNotFoundError
from embedstore.samples import photo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- helpers ----------------------------------------------------------------------------------
def noise_image(path: Path, seed: int, size=(48, 48)) -> Path:
    """A small image with unique content."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def bomb_png(path: Path, w: int, h: int) -> Path:
    """A tiny, valid-looking PNG whose header declares w x h pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def photo_subset(photo_dir: Path, dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(photo_dir.rglob("*.jpg"))[::10][:n]:  # one or two per class
        out.append(Path(shutil.copy(p, dst / p.name)))
    return out


def table_rows(store, name: str, columns) -> dict:
    t = store.storage.read_table(name, columns)
    return {c: t.column(c).to_pylist() for c in columns}


def assert_consistent(store, n: int) -> None:
    """Exactly n images, n vectors, ids unique, no duplicate rows, every image has exactly one vector."""
    imgs = table_rows(store, "images", ["id", "path", "hash"])
    vids = store.storage.vectors_table().search().select(["id"]).limit(None).to_arrow().column("id").to_pylist()
    assert len(imgs["id"]) == n and len(vids) == n
    assert len(set(imgs["id"])) == n and len(set(imgs["path"])) == n and len(set(imgs["hash"])) == n
    assert len(set(vids)) == n and set(vids) == set(imgs["id"])
    info = store.info()
    assert info.images == info.vectors == n


@pytest.fixture()
def new_store(tmp_path):
    return embedstore.open(tmp_path / "s.es")


# ---- dedup, incremental, replaced -------------------------------------------------------------
def test_dedup_same_bytes_same_and_other_path(new_store, photo_dir, tmp_path):
    files = photo_subset(photo_dir, tmp_path / "in", 4)
    r1 = new_store.add([tmp_path / "in"], progress=False)
    assert (r1.added, r1.skipped_duplicates, r1.errors) == (4, 0, 0)
    before = new_store.vectors()

    r2 = new_store.add([tmp_path / "in"], progress=False)  # same files, same paths
    assert (r2.added, r2.skipped_duplicates, r2.resumed) == (0, 4, 0)
    assert r2.embed_seconds == 0  # nothing was embedded

    (tmp_path / "copies").mkdir()
    shutil.copy(files[0], tmp_path / "copies" / "renamed.jpg")  # same bytes, another path
    shutil.copy(files[1], tmp_path / "copies" / "other.jpeg")
    r3 = new_store.add([tmp_path / "copies"], progress=False)
    assert (r3.added, r3.skipped_duplicates) == (0, 2)
    assert_consistent(new_store, 4)
    after = new_store.vectors()
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.vectors, after.vectors)


def test_incremental_add_embeds_only_new_files(new_store, photo_dir, tmp_path):
    photo_subset(photo_dir, tmp_path / "in", 3)
    new_store.add([tmp_path / "in"], progress=False)
    old = new_store.vectors()

    for i in range(2):
        noise_image(tmp_path / "in" / f"new{i}.png", seed=i)
    r = new_store.add([tmp_path / "in"], progress=False)
    assert (r.added, r.skipped_duplicates, r.resumed, r.errors) == (2, 3, 0, 0)
    assert_consistent(new_store, 5)
    new = new_store.vectors()
    np.testing.assert_array_equal(new.vectors[:3], old.vectors)  # old rows untouched
    assert sorted(Path(p).name for p in new.paths[3:]) == ["new0.png", "new1.png"]


def test_replaced_file_at_same_path(new_store, photo_dir, tmp_path):
    files = photo_subset(photo_dir, tmp_path / "in", 3)
    new_store.add([tmp_path / "in"], progress=False)
    old = new_store.vectors()
    target = str(files[0].resolve())
    old_id = int(old.ids[old.paths.index(target)])

    photo("rocket").resize((200, 150)).save(files[0])  # new bytes, same path
    r = new_store.add([tmp_path / "in"], progress=False)
    assert (r.added, r.replaced, r.skipped_duplicates) == (1, 1, 2)
    assert_consistent(new_store, 3)
    new = new_store.vectors()
    new_id = int(new.ids[new.paths.index(target)])
    assert new_id != old_id and old_id not in set(new.ids.tolist())
    assert float(new.vectors[new.paths.index(target)] @ old.vectors[old.paths.index(target)]) < 0.95


# ---- bad files --------------------------------------------------------------------------------
def make_bad_files(d: Path, good_jpeg: Path) -> dict[str, str]:
    """Bad files of each kind -> a fragment of the error recorded for it."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data = good_jpeg.read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "notes.png").write_text("this is not an image\n" * 20)
    bomb_png(d / "bomb.png", 40_000, 40_000)  # 1.6 Gpx: over twice Pillow's limit
    bomb_png(d / "big.png", 10_000, 10_000)  # 100 Mpx: over the limit (a warning in Pillow, an error here)
    return {
        "corrupt.jpg": "UnidentifiedImageError",
        "truncated.jpg": "truncated",
        "notes.png": "UnidentifiedImageError",
        "bomb.png": "DecompressionBomb",
        "big.png": "DecompressionBomb",
    }


def test_bad_files_are_recorded_and_the_run_continues(new_store, photo_dir, tmp_path):
    good = photo_subset(photo_dir, tmp_path / "in", 2)
    expected = make_bad_files(tmp_path / "in", good[0])
    r = new_store.add([tmp_path / "in"], progress=False)
    assert r.added == 2 and r.errors == len(expected)
    by_name = {Path(e.path).name: e.error for e in r.error_list}
    assert set(by_name) == set(expected)
    for name, fragment in expected.items():
        assert fragment in by_name[name], (name, by_name[name])
        assert "\n" not in by_name[name]
    assert_consistent(new_store, 2)
    recorded = {Path(e.path).name: e.error for e in new_store.errors()}
    assert set(recorded) == set(expected)
    assert new_store.info().errors == len(expected)

    # known-bad bytes are not retried; a fixed file at the same path is
    r2 = new_store.add([tmp_path / "in"], progress=False)
    assert (r2.added, r2.errors, r2.skipped_known_errors, r2.skipped_duplicates) == (0, 0, len(expected), 2)
    noise_image(tmp_path / "in" / "notes.png", seed=7)
    r3 = new_store.add([tmp_path / "in"], progress=False)
    assert r3.added == 1 and r3.errors == 0
    assert_consistent(new_store, 3)


def test_all_bad_input_raises(new_store, photo_dir, tmp_path):
    good = photo_subset(photo_dir, tmp_path / "good", 1)
    expected = make_bad_files(tmp_path / "bad", good[0])
    with pytest.raises(NoImagesAddedError) as e:
        new_store.add([tmp_path / "bad"], progress=False)
    msg = str(e.value)
    assert msg.startswith(f"none of the {len(expected)} file(s) could be read as images") and "\n" not in msg
    assert new_store.info().images == 0 and new_store.info().errors == len(expected)


# ---- SIGKILL mid-ingest, then resume ----------------------------------------------------------
# Only the counts matter here, so the store uses a tiny timm architecture (timm's test_efficientnet,
# 160 px) with seeded random weights from a local --weights file: ~10x cheaper per image than lite0.
INGEST = """
import json, sys
import embedstore, embedstore.ingest.ingest
embedstore.ingest.ingest.COMMIT_EVERY = 16  # commit often, so the kill lands between commits
s = embedstore.open(sys.argv[1], backbone="timm:test_efficientnet", weights=sys.argv[3], device="cpu")
r = s.add([sys.argv[2]], batch_size=8, workers=0, progress=False)
print(json.dumps(r.to_dict()))
"""


def committed_vectors(root: Path) -> int:
    """Rows committed so far, read by a fresh connection (as any other reader would)."""
    if not (root / "manifest.json").exists():
        return 0
    version = json.loads((root / "manifest.json").read_text())["active_version"]
    db = lancedb.connect(str(root / "lance"))
    names = db.list_tables()
    names = list(getattr(names, "tables", names))
    return db.open_table(f"vectors_{version}").count_rows() if f"vectors_{version}" in names else 0


def test_sigkill_mid_ingest_then_resume(tmp_path):
    import timm
    import torch

    n = 300
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(n):
        noise_image(src / f"img{i:04d}.png", seed=1000 + i)
    ckpt = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), ckpt)
    root = tmp_path / "killed.es"
    proc = subprocess.Popen([sys.executable, "-c", INGEST, str(root), str(src), str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while committed_vectors(root) < 32:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "ingest did not commit vectors in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = committed_vectors(root)
    assert 32 <= done < n, "the kill must land mid-ingest"

    store = embedstore.open(root, create=False)
    assert store.info().images == n  # every file was recorded before embedding began
    assert len(store.pending_images()) == n - done
    r = store.add([src], batch_size=8, progress=False)
    assert (r.added, r.resumed, r.skipped_duplicates, r.errors) == (0, n - done, n, 0)
    assert_consistent(store, n)
    ids, paths, X = store.vectors()
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in src.iterdir())
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    # a vector embedded before the kill equals one embedded now, for the same image
    again = store.backbone.embed_images([paths[0], paths[-1]])
    np.testing.assert_allclose(again, X[[0, -1]], atol=1e-4)


# ---- concurrent writers -----------------------------------------------------------------------
HOLD_LOCK = """
import sys
import embedstore
s = embedstore.open(sys.argv[1], create=False)
with s.write_lock():
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
"""


def test_second_writer_fails_fast_with_clear_message(photo_store, photo_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import embedstore.cli.core as core
    from embedstore.cli.app import app

    new = noise_image(tmp_path / "extra.png", seed=3)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(photo_store.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()[-2000:]
        second = embedstore.open(photo_store.root, create=False, lock_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as e:
            second.add([new], progress=False)
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert f"is being written by another process (pid {holder.pid})" in msg and "\n" not in msg

        # the CLI shows it as one line, exit code 2 (its open_store waits 0.5 s here instead of 30 s)
        real_open = core.open_store
        monkeypatch.setattr(core, "open_store", lambda *a, **kw: real_open(*a, lock_timeout=0.5, **kw))
        res = CliRunner().invoke(app, ["add", str(photo_store.root), str(new), "--json"])
        assert res.exit_code == 2
        assert "Traceback" not in res.output
        err = res.stderr.strip()
        assert err.startswith("error:") and "being written by another process" in err and "\n" not in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the store is intact and writable once the holder is gone
    r = second.add([new], progress=False)
    assert r.added == 1
    assert_consistent(second, 81)


def test_write_lock_is_reentrant_and_exclusive_between_handles(photo_store):
    other = embedstore.open(photo_store.root, create=False, lock_timeout=0.2)
    with photo_store.write_lock():
        with photo_store.write_lock():  # reentrant in one handle
            pass
        with pytest.raises(StoreLockedError):
            with other.write_lock():
                pass
    with other.write_lock():  # released
        pass


# ---- backbone mismatch ------------------------------------------------------------------------
def test_backbone_mismatch_on_reopen(photo_store_path):
    with pytest.raises(BackboneMismatchError) as e:
        embedstore.open(photo_store_path, backbone="openclip:ViT-B-32/random")
    msg = str(e.value)
    assert "holds vectors of offline:efficientnet_lite0" in msg and "got openclip:ViT-B-32/random" in msg
    assert "Omit --backbone/--weights" in msg and "\n" not in msg
    # naming the store's own backbone is fine
    assert embedstore.open(photo_store_path, backbone="offline:efficientnet_lite0").info().vectors == 80


def test_changed_weights_file_is_refused(tmp_path):
    """A store made with --weights FILE whose file later changes must not mix vectors of two models."""
    import timm
    import torch

    ckpt = tmp_path / "lite0.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("efficientnet_lite0", num_classes=0).state_dict(), ckpt)
    root = tmp_path / "w.es"
    s = embedstore.open(root, backbone="timm:efficientnet_lite0", weights=str(ckpt))
    s.add([noise_image(tmp_path / "a.png", 1)], progress=False)

    sd = torch.load(ckpt)
    next(iter(sd.values())).add_(0.1)
    torch.save(sd, ckpt)
    with pytest.raises(BackboneMismatchError, match="with weights"):
        embedstore.open(root, backbone="timm:efficientnet_lite0", weights=str(ckpt))
    reopened = embedstore.open(root, create=False)
    with pytest.raises(BackboneMismatchError, match="now loads as version .* restore the original weights"):
        reopened.add([noise_image(tmp_path / "b.png", 2)], progress=False)
    assert reopened.info().vectors == 1


def test_open_missing_and_non_store_dirs(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store at .*embedstore add"):
        embedstore.open(tmp_path / "nope.es", create=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(StoreNotFoundError, match="is not an embedstore store"):
        embedstore.open(tmp_path / "full")


# ---- EXIF and vectors() -----------------------------------------------------------------------
def test_exif_orientation_is_respected(new_store, tmp_path):
    upright = photo("chelsea").resize((320, 240))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # pixels as a sideways camera wrote them
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    d = tmp_path / "exif"
    d.mkdir()
    upright.save(d / "a_upright.jpg", quality=95)
    stored.save(d / "b_exif.jpg", quality=95, exif=exif.tobytes())
    stored.save(d / "c_sideways.jpg", quality=95)
    new_store.add([d], progress=False)
    ids, paths, X = new_store.vectors()
    assert [Path(p).name for p in paths] == ["a_upright.jpg", "b_exif.jpg", "c_sideways.jpg"]
    assert X[0] @ X[1] > 0.98
    assert X[0] @ X[1] > X[0] @ X[2] + 0.02


def test_vectors_ids_paths_shapes_and_norms(photo_store_path, photo_labels):
    store = embedstore.open(photo_store_path, create=False)
    vs = store.vectors()
    ids, paths, X = vs
    assert ids.dtype == np.int64 and ids.shape == (80,) and np.all(np.diff(ids) > 0)
    assert X.dtype == np.float32 and X.shape == (80, 1280) and len(paths) == 80 and len(vs) == 80
    assert sorted(paths) == sorted(photo_labels)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert vs.version == store.active_version == store.info().version

    pick = [int(ids[5]), int(ids[0]), 10**9]  # unknown ids are left out
    sub = store.vectors(ids=pick)
    assert sub.ids.tolist() == sorted(pick[:2])
    np.testing.assert_array_equal(sub.vectors, X[[0, 5]])
    assert sub.paths == [paths[0], paths[5]]
    assert store.paths_for([ids[3]]) == [paths[3]]
    empty = store.vectors(ids=[])
    assert empty.vectors.shape == (0, 1280) and len(empty.paths) == 0

    # views of one photo sit closer together than views of different photos
    labels = np.array([photo_labels[p] for p in paths])
    S = X @ X.T
    same = S[labels[:, None] == labels[None, :]].mean()
    diff = S[labels[:, None] != labels[None, :]].mean()
    assert same > diff + 0.1


# ---- the pipeline's preprocessing ---------------------------------------------------------------
@pytest.mark.parametrize("size", [(640, 480), (300, 500), (50, 30), (224, 224), (1000, 257)])
def test_pipeline_preprocessing_matches_the_model_transform(size):
    """uint8 resize+crop per image, then one normalisation per batch == the model's eval transform."""
    import torch

    from embedstore.ingest.backbones.base import PreprocessCfg
    from embedstore.ingest.pipeline import normalize_batch, preprocess_uint8

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for pre in (PreprocessCfg(), PreprocessCfg(input_size=(3, 160, 160), interpolation="bilinear", crop_pct=1.0)):
        ref = pre.build_transform()(im)
        x = normalize_batch(torch.from_numpy(preprocess_uint8(im, pre))[None], pre)
        assert x.shape == (1, *ref.shape) and x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=0)


def test_ingest_vectors_equal_query_vectors_threads_and_worker_process(new_store, photo_dir, tmp_path):
    """Store vectors (CPU thread streams, and a DataLoader worker process) == backbone.embed_images."""
    import torch

    from embedstore.ingest.pipeline import cpu_streams

    files = photo_subset(photo_dir, tmp_path / "in", 5)
    torch.set_num_threads(2)  # two streams of one intra-op thread each (the module runs on one thread)
    try:
        assert cpu_streams() == 2
        new_store.add([tmp_path / "in"], batch_size=2, progress=False)  # 3 batches over 2 streams
        assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(1)
    ids, paths, X = new_store.vectors()
    ref = new_store.backbone.embed_images([str(p) for p in paths])
    np.testing.assert_allclose(X, ref, atol=1e-5)

    other = embedstore.open(tmp_path / "w.es")
    other.add(files, batch_size=2, workers=1, progress=False)  # forkserver worker process
    np.testing.assert_allclose(other.vectors().vectors, X, atol=1e-5)


def test_gpu_decode_path_matches_pillow_path(tmp_path, photo_dir):
    """The nvJPEG path (run here on the CPU: torchvision's decode_jpeg) gives nearly the vectors of the Pillow
    path; non-JPEGs and bad files take the fallback and the errors table."""
    from PIL import Image

    src = sorted(photo_dir.rglob("*.jpg"))[:6]
    d = tmp_path / "imgs"
    d.mkdir()
    for p in src:
        (d / p.name).write_bytes(p.read_bytes())
    Image.open(src[0]).save(d / "as_png.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    a = embedstore.open(tmp_path / "a.es", device="cpu")
    ra = a.add([d], progress=False, gpu_decode=True, workers=0)
    b = embedstore.open(tmp_path / "b.es", device="cpu")
    rb = b.add([d], progress=False)
    assert ra.added == rb.added == 7 and ra.errors == rb.errors == 1
    va, vb = a.vectors(), b.vectors()
    assert va.paths == vb.paths
    cos = (va.vectors * vb.vectors).sum(1)
    assert cos.min() > 0.97, cos  # resize kernels differ slightly (tensor vs Pillow antialiasing)
