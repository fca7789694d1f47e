"""The two files at a store's root: manifest.json (what the store is) and .lock (who writes it).

manifest.json is read and checked before use, written atomically with a backup, migrated by format:

    {"schema_version": 2, "created": "...", "active_version": "<version>", "next_id": <int>,
     "versions": {"<version>": {"name": ..., "dim": ..., "weights": ..., "preprocess": ..., "parent": ...}}}

`schema_version` is the store format. 1: stores made before index checksums. 2: every index sidecar
(index/<version>.json) carries the sha256 of its .faiss file. A store of an older format is migrated
step by step (MIGRATIONS) under the write lock when opened, and only in memory when it cannot be
written; a newer format is refused with "made by a newer embedstore". Every write also refreshes
manifest.json.bak, the copy `embedstore check STORE --repair` restores when manifest.json is damaged.

.lock is an fcntl lock held by the one process writing (its pid inside). A user who cannot open it for
writing cannot write the store: StoreNotWritableError, while reading needs no lock at all.
storage.py (the only user of this module) decides when to read, write and lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from embedstore.errors import CorruptStoreError, StoreFormatError, StoreLockedError, StoreNotWritableError

FORMAT = 2  # the store format this code writes (manifest "schema_version")
MANIFEST = "manifest.json"
BACKUP = MANIFEST + ".bak"
TMP = MANIFEST + ".tmp"
LOCK = ".lock"
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
REQUIRED = {"schema_version": int, "active_version": str, "next_id": int, "versions": dict}


def problem(m) -> str | None:
    """Why `m` (parsed JSON) is not a usable manifest, or None. Never raises."""
    if not isinstance(m, dict):
        return f"it holds a JSON {type(m).__name__}, not an object" if m is not None else "it holds null"
    if not m:
        return "it is an empty JSON object"
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        return f"missing keys: {', '.join(missing)}"
    bad = [k for k, t in REQUIRED.items() if not isinstance(m[k], t) or isinstance(m[k], bool)]
    if bad:
        return f"wrong type of {', '.join(bad)}"
    if m["schema_version"] < 1 or m["next_id"] < 0:
        return "schema_version or next_id is out of range"
    for v, e in m["versions"].items():
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not _positive_int(e.get("dim")):
            return f"version {v!r} lacks its backbone name or vector size (dim)"
    if m["active_version"] not in m["versions"]:
        known = ", ".join(m["versions"]) or "none"
        return f"its active version {m['active_version']!r} is not one of its versions ({known})"
    return None


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def parse(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when `path` holds a usable manifest of any format, else (None, why not)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, "the file is missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read it: {_short(e)}"
    if not text.strip():
        return None, "the file is empty"
    try:
        m = json.loads(text)
    except ValueError as e:
        return None, f"truncated or invalid JSON: {_short(e)}"
    why = problem(m)
    return (None, why) if why else (m, None)


def read(root: Path) -> dict:
    """The manifest of the store at `root`, checked; CorruptStoreError or StoreFormatError otherwise."""
    root = Path(root)
    m, why = parse(root / MANIFEST)
    if m is None:
        raise CorruptStoreError(
            f"{root / MANIFEST} is unreadable ({why}); restore it from a backup or run `embedstore check {root} --repair`"
        )
    if m["schema_version"] > FORMAT:
        raise StoreFormatError(
            f"store {root} was made by a newer embedstore (store format {m['schema_version']}; this one reads formats "
            f"up to {FORMAT}); upgrade embedstore (pip install -U embedstore) to open it"
        )
    return m


def write(root: Path, m: dict) -> None:
    """Atomic replace (temp file + rename), then the backup copy; call under the write lock."""
    root = Path(root)
    text = json.dumps(m, indent=2)
    tmp = root / TMP
    tmp.write_text(text)
    os.replace(tmp, root / MANIFEST)
    (root / BACKUP).write_text(text)  # a torn backup fails parse() and is not used; the manifest is already safe


def recover(root: Path) -> tuple[dict | None, str]:
    """A usable manifest to restore (the backup, else a complete leftover temp file) and where it came from;
    (None, why none) when neither can be used."""
    root = Path(root)
    whys = []
    for name in (BACKUP, TMP):
        m, why = parse(root / name)
        if m is not None and m["schema_version"] <= FORMAT:
            return m, name
        whys.append(f"{name}: {why or 'a newer format'}")
    return None, "; ".join(whys)


# ---- migrations ------------------------------------------------------------------------------
def _v1_to_v2(root: Path, m: dict, write_files: bool) -> dict:
    """Format 2: index sidecars carry the sha256 of their .faiss file (format-1 ones get it here when the file
    still has the size they recorded and loads; any other is left to be rebuilt on the next search)."""
    if write_files:
        from embedstore.search import faiss_index as fx  # the sidecar format is the index module's business

        for v, e in m["versions"].items():
            fx.upgrade_sidecar(Path(root) / "index" / f"{v}.faiss", e["dim"])
    return {**m, "schema_version": 2}


MIGRATIONS: dict[int, Callable[[Path, dict, bool], dict]] = {1: _v1_to_v2}  # from format N to N + 1


def upgrade(root: Path, m: dict, write_files: bool) -> dict:
    """`m` migrated to FORMAT; with write_files=False only in memory (the files are left as they are)."""
    while m["schema_version"] < FORMAT:
        m = MIGRATIONS[m["schema_version"]](root, m, write_files)
    return m


# ---- the write lock ----------------------------------------------------------------------------
def remove_store(root: Path, made: str) -> None:
    """Delete a store that was just made and holds nothing yet: its contents, and the directory itself when
    `made` == "dir" (it did not exist before; "contents": it was an empty directory the user made)."""
    for p in Path(root).iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if made == "dir":
        Path(root).rmdir()


def open_lock(root: Path) -> int:
    """The lock file's descriptor; StoreNotWritableError when this user cannot write the store."""
    root = Path(root)
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in READ_ONLY_ERRNOS:
            raise
        raise not_writable(root, f"{e.strerror} on {LOCK}") from None
    for p in (root, root / "lance"):
        if p.is_dir() and not os.access(p, os.W_OK):
            os.close(fd)
            raise not_writable(root, f"no write permission on {p}")
    return fd


def not_writable(root: Path, why: str) -> StoreNotWritableError:
    return StoreNotWritableError(
        f"store {root} is not writable by you ({why}); reading commands (info, search, duplicates, labels, versions, "
        f"export) still work. To change it, ask its owner for write access or work on a copy (cp -r {root} COPY)"
    )


def acquire_lock(root: Path, timeout: float) -> int:
    """Take the exclusive lock (waiting up to `timeout` s, then StoreLockedError); returns its descriptor."""
    fd = open_lock(root)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StoreLockedError(
                    f"store {root} is being written by another process (pid {holder}); "
                    "wait for it to finish, or stop it, then retry"
                ) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_holder(root: Path) -> str | None:
    """The pid written by the process holding the lock now, "?" if unknown, None when free (needs only read access)."""
    try:
        fd = os.open(Path(root) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= 120 else s[:117] + "..."
