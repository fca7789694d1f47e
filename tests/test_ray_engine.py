"""The Ray engine (--engine ray) and stores whose tables live on object storage.

A real local Ray (ray.init(num_cpus=2)) and a real S3-compatible server on localhost (moto in server mode)
stand in for a cluster and a bucket. The Ray path must give the same rows and vectors (cosine >= 0.9999)
as the single-machine path on the same images, survive a killed worker and a killed driver without
duplicates, and work the same with images and tables on S3.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.ingest.backbones import load_backbone
from embedstore.ingest.ray_engine import RayEngine

ray = pytest.importorskip("ray")
BUCKET = "embedstore-test"


# ---- fixtures: an S3 server, then a local Ray that inherits its settings ---------------------------------
@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free localhost port; AWS_* set for this process and the Ray workers it starts."""
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def cluster(s3):
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def photos_s3(s3, photo_dir):
    """The photo views uploaded to s3://BUCKET/photos/ (same bytes, so the same content hashes)."""
    for p in sorted(photo_dir.rglob("*.jpg")):
        s3.upload_file(str(p), BUCKET, f"photos/{p.relative_to(photo_dir).as_posix()}")
    return f"s3://{BUCKET}/photos/"


def by_hash(store) -> dict[str, np.ndarray]:
    """content hash -> vector: compares stores whose ids or paths differ (local files vs s3://)."""
    vs = store.vectors()
    imgs = store.storage.read_table("images", ["id", "hash"]).to_pylist()
    h = {r["id"]: r["hash"] for r in imgs}
    return {h[int(i)]: v for i, v in zip(vs.ids, vs.vectors)}


def assert_same_vectors(a: dict, b: dict) -> None:
    assert set(a) == set(b) and len(a) > 0
    cos = min(float(a[k] @ b[k]) for k in a)
    assert cos >= 0.9999, cos


def no_duplicates(store) -> int:
    ids = store.vector_ids()
    assert len(ids) == len(np.unique(ids))
    assert set(ids.tolist()) == store.storage.image_ids()
    return len(ids)


# ---- add --------------------------------------------------------------------------------------------------
def test_ray_add_gives_the_rows_and_vectors_of_the_local_engine(cluster, photo_dir, photo_store_path, tmp_path):
    src = tmp_path / "imgs"
    shutil.copytree(photo_dir, src)
    (src / "broken.jpg").write_bytes(b"not an image")
    s = embedstore.open(tmp_path / "ray.es")
    res = s.add([src], engine="ray", progress=False)
    assert res.added == 80 and res.errors == 1 and res.device.startswith("ray")
    assert res.error_list[0].path.endswith("broken.jpg") and "cannot identify image" in res.error_list[0].error
    assert [e.path for e in s.errors()] == [str(src / "broken.jpg")]
    local = embedstore.open(photo_store_path, create=False)
    assert_same_vectors(by_hash(s), by_hash(local))
    assert no_duplicates(s) == 80
    again = s.add([src], engine="ray", progress=False)  # dedup by content: nothing embedded twice
    assert (again.added, again.skipped_duplicates, again.skipped_known_errors) == (0, 80, 1)


def test_a_killed_embedding_actor_is_restarted_and_every_image_comes_once(cluster, digits_dir):
    """SIGKILL one actor process mid-run: Ray restarts it and retries its batches; the engine yields each id once."""
    psutil = pytest.importorskip("psutil")
    items = [(i, str(p)) for i, p in enumerate(sorted(digits_dir.rglob("*.png")))]
    bb = load_backbone("offline:efficientnet_lite0")
    eng = RayEngine(workers=2, batch_size=8)
    seen, killed = [], []
    for ids, vecs, bad in eng.embed(bb, items):
        seen += ids.tolist()
        assert not bad and vecs.shape == (len(ids), bb.dim)
        if not killed:
            for p in psutil.process_iter(["cmdline"]):
                if any("MapWorker" in c and "Embedder" in c for c in p.info["cmdline"] or []):
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                    break
    assert killed, "no embedding actor was found to kill"
    assert sorted(seen) == [i for i, _ in items]  # each id exactly once, none lost


def test_a_worker_killed_during_add_ends_in_a_complete_store(cluster, digits_dir, digits_store_path, photo_dir,
                                                            photo_store_path, tmp_path):
    """The same through Store.add: an embedding actor SIGKILLed while it embeds (it has used a second of CPU);
    the store ends complete, each image once, with the local engine's vectors."""
    psutil = pytest.importorskip("psutil")
    killed, done = [], threading.Event()

    def killer():
        while not done.is_set():
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any("MapWorker" in c and "Embedder" in c for c in p.info["cmdline"] or []) and \
                            sum(p.cpu_times()[:2]) >= 1.0 and not done.is_set():
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    s = embedstore.open(tmp_path / "k.es")
    res = s.add([digits_dir, photo_dir], engine="ray", workers=2, batch_size=4, progress=False)
    done.set()
    t.join()
    assert killed, "the add ended before an embedding actor could be killed"
    assert res.added == 280 and no_duplicates(s) == 280
    local = {**by_hash(embedstore.open(digits_store_path, create=False)),
             **by_hash(embedstore.open(photo_store_path, create=False))}
    assert_same_vectors(by_hash(s), local)


def test_decoding_in_separate_tasks_gives_the_same_vectors(cluster, photo_dir, photo_store_path):
    """The GPU layout (CPU decode tasks feeding model actors), run on CPU: same vectors as the local engine."""
    local = embedstore.open(photo_store_path, create=False)
    vs = local.vectors()
    items = list(zip(vs.ids.tolist(), vs.paths))[:24]
    eng = RayEngine(workers=1, batch_size=8, decode_tasks=True)
    got = {}
    for ids, vecs, bad in eng.embed(local.backbone, items):
        got.update(zip(ids.tolist(), vecs))
    assert sorted(got) == [i for i, _ in items]
    assert min(float(got[i] @ v) for i, v in zip(vs.ids[:24].tolist(), vs.vectors[:24])) >= 0.9999
    with pytest.raises(embedstore.EmbedstoreError, match="has 0 GPUs"):  # refused, instead of waiting forever
        RayEngine(gpus_per_worker=1).pool_size()


@pytest.mark.slow
def test_a_killed_driver_resumes_without_duplicates(cluster, digits_dir, tmp_path):
    """Kill `embedstore add --engine ray` (SIGKILL) once its images are recorded; the next run embeds the rest."""
    store = tmp_path / "d.es"
    cmd = [sys.executable, "-m", "embedstore.cli.app", "add", str(store), str(digits_dir), "--engine", "ray",
           "--address", cluster, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if embedstore.open(store, create=False, lock_timeout=0.1).storage.count("images") > 0:
                break
        except Exception:
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    s = embedstore.open(store, create=False)
    before = len(s.vector_ids())
    assert s.storage.count("images") == 200 and before < 200  # killed between the two stages
    res = s.add([digits_dir], engine="ray", progress=False)
    assert (res.added, res.skipped_duplicates, res.resumed) == (0, 200, 200 - before)
    assert no_duplicates(s) == 200


# ---- classify -------------------------------------------------------------------------------------------
def test_ray_classify_writes_the_predictions_of_the_local_engine(cluster, photo_store, photo_labels):
    s = photo_store
    for path, c in list(photo_labels.items())[::5]:
        s.label([path], c)
    local = s.classify()
    want = {r["id"]: (r["label"], r["confidence"]) for r in s.predictions().to_pylist()}
    res = s.classify(engine="ray")
    got = {r["id"]: (r["label"], r["confidence"]) for r in s.predictions().to_pylist()}
    assert res.predicted == len(want) == len(got) and res.chosen == local.chosen and res.reason == local.reason
    assert all(got[i][0] == want[i][0] and abs(got[i][1] - want[i][1]) < 1e-3 for i in want)
    assert {c: d.count for c, d in res.per_class.items()} == {c: d.count for c, d in local.per_class.items()}
    # a newly labeled image loses its prediction on the next run (older rows are deleted in the last commit)
    first = next(iter(want))
    s.label([first], want[first][0])
    s.classify(engine="ray")
    assert first not in {r["id"] for r in s.predictions().to_pylist()}


# ---- object storage -----------------------------------------------------------------------------------------
def test_images_on_s3_give_the_vectors_of_the_local_files(cluster, photos_s3, photo_store_path, tmp_path):
    local = by_hash(embedstore.open(photo_store_path, create=False))
    s = embedstore.open(tmp_path / "local-engine.es")
    res = s.add([photos_s3], progress=False)  # the single-machine engine reads s3:// too
    assert res.added == 80 and all(p.startswith(f"s3://{BUCKET}/photos/") for p in s.vectors().paths)
    assert_same_vectors(by_hash(s), local)  # the Ray engine on the same URIs: the next test


def test_a_store_with_its_tables_on_s3_works_like_a_local_one(cluster, photos_s3, photo_store_path, photo_labels, tmp_path):
    """The same steps as on a local store: add (ray), resume/dedup, search, label, classify (both engines), reopen."""
    uri = f"s3://{BUCKET}/stores/{tmp_path.name}"
    s = embedstore.open(tmp_path / "s.es", tables=uri)
    assert s.add([photos_s3], engine="ray", progress=False).added == 80
    assert not (tmp_path / "s.es" / "lance").exists()  # the tables are in the bucket, not in the folder
    assert_same_vectors(by_hash(s), by_hash(embedstore.open(photo_store_path, create=False)))
    s2 = embedstore.open(tmp_path / "s.es", create=False)  # reopened: the manifest knows where the tables are
    assert s2.storage.tables_uri == uri and s2.add([photos_s3], progress=False).skipped_duplicates == 80
    vs = s2.vectors()
    hits = s2.search(vector=vs.vectors[7], k=3)  # the index is built from the tables in the bucket
    assert hits[0].id == int(vs.ids[7]) and hits[0].score > 0.999
    names = {Path(p).name: p for p in s2.vectors().paths}
    for path, c in list(photo_labels.items())[::5]:
        s2.label([names[Path(path).name]], c)
    a = s2.classify()
    b = s2.classify(engine="ray")
    assert b.predicted == len(a.predictions) and b.chosen == a.chosen
    assert s2.info().images == 80 and s2.info().tables == uri


def test_bad_engine_and_location_arguments_are_one_line_errors(tmp_path, photo_dir):
    from typer.testing import CliRunner

    from embedstore.cli.app import app

    runner = CliRunner()
    cases = [
        (["add", str(tmp_path / "a.es"), str(photo_dir), "--engine", "spark"], "unknown engine 'spark'"),
        (["add", "s3://bucket/store", str(photo_dir)], "STORE must be a local folder"),
        (["add", str(tmp_path / "b.es"), str(photo_dir), "--tables", "/tmp/x"], "not an object-storage URI"),
        (["add", str(tmp_path / "c.es"), str(photo_dir), "--address", "auto"], "are for --engine ray"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a.es").exists() and not (tmp_path / "b.es").exists()
