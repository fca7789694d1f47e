"""UI faults of issue 13, each tried for real: bad uploads on Search (AppTest), SIGTERM of `embedstore ui`
and Host-header checks (a real `embedstore ui` subprocess, raw sockets), a UI save while another
process holds the store's write lock (AppTest + a real lock holder in a subprocess)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit", reason="the UI extra is not installed: pip install 'embedstore[ui]'")

from PIL import Image  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

import embedstore  # noqa: E402
from embedstore.ui import common  # noqa: E402
from test_ui import open_app  # noqa: E402  (tests/ is on sys.path: one AppTest opener for both files)

ABS_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|usr|var)/")


# ---- helpers -------------------------------------------------------------------------------------


def result_captions(at) -> list[str]:
    return [c for img in at.image for c in img.captions if c[:1].isdigit() or c[:1] == "-"]


def photo_paths(store) -> list[str]:
    return sorted(store.paths_for(store.vector_ids().tolist()))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height (400 megapixels by default) that is only ~50 KB on disk."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gray16_png(path: str) -> bytes:
    """The photo as a valid 16-bit grayscale PNG (mode I;16: values 0..65535)."""
    g = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, "PNG")  # uint16 -> mode I;16
    return buf.getvalue()


def gray8_png(path: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("L").save(buf, "PNG")
    return buf.getvalue()


def upload(at, name: str, data: bytes, mime: str) -> AppTest:
    at.file_uploader(key="search_upload").set_value((name, data, mime)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ---- 11: bad uploads on Search -------------------------------------------------------------------
BAD_UPLOADS = {
    "not-an-image": lambda p: ("notes.png", b"this is a text file, not an image\n" * 20, "image/png"),
    "truncated-jpeg": lambda p: ("cut.jpg", Path(p).read_bytes()[: len(Path(p).read_bytes()) // 3], "image/jpeg"),
    "400-megapixel-png": lambda p: ("huge.png", huge_png(), "image/png"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_is_one_line_in_the_page_and_the_page_recovers(photo_store, monkeypatch, case):
    at = open_app(photo_store, monkeypatch)
    name, data, mime = BAD_UPLOADS[case](photo_paths(photo_store)[0])
    upload(at, name, data, mime)
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    msg = errors[0]
    assert "\n" not in msg and "Traceback" not in msg and not ABS_PATH.search(msg), msg
    assert name in msg, msg  # names the upload, not a temporary file
    assert not result_captions(at)
    assert at.button(key="search_clear")  # drawn, so the user can leave the failed query
    # the page keeps working: a good upload replaces the bad one ...
    good = photo_paths(photo_store)[5]
    upload(at, Path(good).name, Path(good).read_bytes(), "image/jpeg")
    assert not at.error and len(result_captions(at)) == 24
    # ... and removing the upload clears the query: back to browsing
    upload(at, name, data, mime)
    at.file_uploader(key="search_upload").set_value(None).run()
    assert not at.exception and not at.error
    assert "search_query" not in at.session_state
    assert "search_clear" not in [b.key for b in at.button]
    assert any(b.key and b.key.startswith("browse_nb_") for b in at.button)


def test_clear_query_button_after_a_bad_upload(photo_store, monkeypatch):
    at = open_app(photo_store, monkeypatch)
    upload(at, "notes.jpg", b"\x00" * 1000, "image/jpeg")
    assert len(at.error) == 1
    at.button(key="search_clear").click().run()
    assert not at.exception and not at.error and "search_query" not in at.session_state
    assert any(b.key and b.key.startswith("browse_nb_") for b in at.button)


def test_16bit_png_upload_searches(photo_store, monkeypatch):
    at = open_app(photo_store, monkeypatch)
    src = photo_paths(photo_store)[5]
    upload(at, "gray16.png", gray16_png(src), "image/png")
    assert not at.error, [e.value for e in at.error]
    assert len(result_captions(at)) == 24
    assert any(c == "query: gray16.png" for img in at.image for c in img.captions)  # the query is shown


def test_16bit_png_searches_like_its_8bit_twin(photo_store, monkeypatch):
    src = photo_paths(photo_store)[5]
    at = open_app(photo_store, monkeypatch)
    top8 = result_captions(upload(at, "gray8.png", gray8_png(src), "image/png"))[:3]
    top16 = result_captions(upload(at, "gray16.png", gray16_png(src), "image/png"))[:3]
    ids = [[c.split(" · ")[1].split()[0] for c in top] for top in (top8, top16)]
    assert ids[0] == ids[1], (top8, top16)


# ---- 14: a UI save while another process writes --------------------------------------------------
HOLDER = """
import sys, time, embedstore
s = embedstore.open(sys.argv[1], create=False)
with s.write_lock():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


class LockHolder:
    """A real second process that takes the store's write lock (as a CLI `add` does) and holds it."""

    def __init__(self, root: Path, seconds: float):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def locked(self) -> "LockHolder":
        assert self.proc.stdout.readline().strip() == "locked"  # it imports embedstore first (seconds)
        return self


@pytest.fixture()
def lock_holder(photo_store):
    holders: list[LockHolder] = []

    def start(seconds: float) -> LockHolder:
        holders.append(LockHolder(photo_store.root, seconds))
        return holders[-1]

    yield start
    for h in holders:
        h.proc.kill()
        h.proc.wait()


def _label_three(at) -> list[int]:
    boxes = [cb for cb in at.checkbox if cb.key and cb.key.startswith("label_sel_")][:3]
    for cb in boxes:
        cb.check()
    at.selectbox(key="label_cls").set_value(common.NEW_CLASS).run()
    at.text_input(key="label_newcls").input("zebra").run()
    return [int(cb.key.rsplit("_", 1)[1]) for cb in boxes]


def test_save_while_another_process_writes_gives_up_with_a_clear_message(photo_store, monkeypatch, lock_holder):
    monkeypatch.setattr(common, "WRITE_WAIT_S", 2.0)
    holder = lock_holder(60)  # starts while the app opens
    at = open_app(photo_store, monkeypatch, "Label")
    _label_three(at)
    holder.locked()
    t0 = time.monotonic()
    at.button(key="label_save").click().run()
    waited = time.monotonic() - t0
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0] and "nothing was saved" in errors[0], errors
    assert "\n" not in errors[0] and 1.8 <= waited < 30
    assert "zebra" not in embedstore.open(photo_store.root, create=False).classes()


def test_save_waits_for_another_process_then_saves(photo_store, monkeypatch, lock_holder):
    holder = lock_holder(3)
    at = open_app(photo_store, monkeypatch, "Label")
    chosen = _label_three(at)
    holder.locked()
    t0 = time.monotonic()
    at.button(key="label_save").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert time.monotonic() - t0 >= 2  # it waited for the holder instead of failing
    assert not at.error, [e.value for e in at.error]
    msgs = [s.value for s in at.success]
    assert any("labeled 3 image(s)" in m and f"pid {holder.pid}" in m for m in msgs), msgs
    lab = embedstore.open(photo_store.root, create=False).labels()
    assert sorted(i for i, c in lab.items() if c == "zebra") == sorted(chosen)


def test_waiting_message_comes_before_the_wait(photo_store, lock_holder):
    """What the page shows while it waits (Streamlit sends an element to the browser as it is drawn)."""
    holder = lock_holder(60).locked()
    seen: list[tuple[str, float]] = []
    t0 = time.monotonic()
    with pytest.raises(embedstore.errors.StoreLockedError) as e:
        with common.write_access(photo_store, wait=1.0, notify=lambda m: seen.append((m, time.monotonic() - t0))):
            raise AssertionError("the lock is held by another process")
    assert [m for m, _ in seen] == [f"waiting for another process writing the store (pid {holder.pid})…"]
    assert seen[0][1] < 0.5 and time.monotonic() - t0 >= 1.0  # told at once, then waited
    assert f"pid {holder.pid}" in str(e.value) and "nothing was saved" in str(e.value)


# ---- 12, 13: the `embedstore ui` process --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("embedstore")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "embedstore.cli.app"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _request(port: int, host: str, path: str = "/", extra: str = "Connection: close\r\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/") else 0


def _ws_handshake(port: int, host: str, origin: str) -> int:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = (f"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\nSec-WebSocket-Protocol: streamlit\r\n")
    return _status(_request(port, host, "/_stcore/stream", extra))


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _start_ui(store: Path, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(_cli() + ["ui", str(store), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`embedstore ui` exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if _status(_request(port, f"127.0.0.1:{port}", "/_stcore/health")) == 200:
                return proc
        except OSError:  # not listening yet, or still starting
            pass
        time.sleep(0.3)
    raise AssertionError("the UI did not answer within 120 s")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def ui_store(photo_store_path, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("ui") / "photos.es"
    shutil.copytree(photo_store_path, store)
    return store


@pytest.fixture(scope="module")
def ui_port(ui_store):
    port = _free_port()
    proc = _start_ui(ui_store, port, "--allow-host", "ui.example")
    yield port
    _stop(proc)


@pytest.mark.slow  # starts `embedstore ui` (~20 s on 2 busy cores)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_signal_to_embedstore_ui_stops_streamlit_too(ui_store, sig):
    port = _free_port()
    proc = _start_ui(ui_store, port)
    try:
        kids = _children(proc.pid)
        assert kids, "no streamlit child found"
        os.kill(proc.pid, sig)  # the parent only, as `kill -TERM PID` or systemd would
        proc.wait(timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (any(_alive(k) for k in kids) or _port_open(port)):
            time.sleep(0.2)
        assert not [k for k in kids if _alive(k)], "the streamlit child outlived `embedstore ui`"
        assert not _port_open(port), f"port {port} still answers"
    finally:
        _stop(proc)


@pytest.mark.slow
def test_http_requests_with_a_foreign_host_are_refused(ui_port):
    p = ui_port
    for path in ("/", "/_stcore/health", "/static/nope.js"):
        resp = _request(p, f"evil.example:{p}", path)
        assert 400 <= _status(resp) < 500, resp[:200]
    assert _status(_request(p, f"127.0.0.1:{p}")) == 200
    assert _status(_request(p, f"localhost:{p}")) == 200
    assert _status(_request(p, f"ui.example:{p}")) == 200  # --allow-host ui.example
    assert 400 <= _status(_request(p, "127.0.0.1:1")) < 500  # another port is another origin


@pytest.mark.slow
def test_websocket_with_a_foreign_host_is_refused(ui_port):
    p = ui_port
    assert _ws_handshake(p, f"evil.example:{p}", f"http://evil.example:{p}") != 101
    assert _ws_handshake(p, f"127.0.0.1:{p}", f"http://127.0.0.1:{p}") == 101
    assert _ws_handshake(p, f"localhost:{p}", f"http://localhost:{p}") == 101


def test_host_names_allowed_for_a_bind_address():
    from embedstore.ui.server import allowed_hosts, host_allowed

    local = allowed_hosts("127.0.0.1")
    assert host_allowed("127.0.0.1:8501", 8501, local) and host_allowed("LOCALHOST.:8501", 8501, local)
    assert host_allowed("[::1]:8501", 8501, local)
    for bad in ("evil.example:8501", "127.0.0.1:8502", "127.0.0.1", "", None, "user@127.0.0.1:8501",
                "127.0.0.1:8501/x", "127.0.0.1:99999", "evil.example"):
        assert not host_allowed(bad, 8501, local), bad
    lan = allowed_hosts("192.168.7.9", "ui.example, Proxy.Example")
    assert {"192.168.7.9", "ui.example", "proxy.example", "localhost"} <= lan and "evil.example" not in lan
    assert host_allowed("proxy.example:80", 80, lan) and host_allowed("proxy.example", 80, lan)
    anywhere = allowed_hosts("0.0.0.0")
    assert socket.gethostname().lower() in anywhere and "evil.example" not in anywhere
    assert allowed_hosts("127.0.0.1", "*") is None and host_allowed("evil.example:1", 8501, None)
