"""Ingest: add / remove images, embed what a version lacks, the errors table.

`add` first records new images (content-hash dedup; ids reserved in the manifest before any row is
written), then embeds every image that has no vector in the active version, committing in batches of
COMMIT_EVERY: a killed run, started again, continues where it stopped and embeds nothing twice.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from embedstore.clock import now
from embedstore.errors import EmptyInputError, NoImagesAddedError, error_text
from embedstore.ingest.backbones.base import Backbone
from embedstore.ingest.pipeline import EmbedStats, embed_items, list_image_files
from embedstore.progress import progress_bar, progress_iter
from embedstore.results import AddResult, ImageError, RemoveResult
from embedstore.ingest.sources import hash_and_size
from embedstore.storage import Storage, id_in, sql_str, vectors_table_name

COMMIT_EVERY = 256  # images per vector commit: a kill loses at most this much work


class IngestService:
    """Adds and removes images; embeds pending images of any version with `backbone_for(version)`."""

    def __init__(
        self,
        storage: Storage,
        backbone_for: Callable[[str], Backbone],
        device: Callable[[], str],
        on_vectors_changed: Callable[[str], None] = lambda version: None,
    ):
        self.storage = storage
        self.backbone_for = backbone_for
        self.device = device
        self.on_vectors_changed = on_vectors_changed  # the index follows the vectors table

    # ---- add ------------------------------------------------------------------------------------
    def add(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = True,
        gpu_decode: bool = False,
        engine=None,
    ) -> AddResult:
        """Add image files/folders: dedup by content hash, embed new images, commit in batches.

        engine: None (this machine) or a RayEngine (hashing and embedding as Ray jobs; this process commits)."""
        t0 = time.perf_counter()
        paths = list(paths)
        if not paths:
            raise EmptyInputError("no paths given; pass image files or folders to add")
        files, missing = list_image_files(paths)
        if not files:
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise EmptyInputError(f"not found: {', '.join(missing[:3])}{more}; check the path(s) and pass image "
                                      "files or folders that exist")
            raise EmptyInputError(f"no image files found in {', '.join(map(str, paths[:3]))}; pass image files or "
                                  "folders holding them")
        res = AddResult(missing_paths=missing)
        st = self.storage
        with st.write_lock():
            new_ids = self._record_images(files, res, progress, engine)
            pending = self.pending(st.active_version)
            res.resumed = len([i for i, _ in pending if i not in new_ids])
            self.embed_pending(st.active_version, pending, res, batch_size=batch_size, workers=workers,
                               progress=progress, gpu_decode=gpu_decode, engine=engine)
            res.added = len(new_ids) - len([e for e in res.error_list if e.id in new_ids])
            if res.added + res.resumed > 0:
                self._vectors_changed()
        res.seconds = time.perf_counter() - t0
        if res.added == 0 and res.resumed == 0 and res.errors and not res.skipped_duplicates + res.skipped_known_errors:
            first = res.error_list[0]
            raise NoImagesAddedError(
                f"none of the {res.errors} file(s) could be read as images (first: {first.path}: {first.error}); "
                "see `embedstore info --json` for the errors table"
            )
        return res

    @staticmethod
    def _hashed(files: list[str], progress: bool, engine) -> Iterator[tuple[str, str | None, int | None, str | None]]:
        """(path, hash, size, None) or (path, None, None, error) per file: here, or as a Ray job."""
        if engine is not None:
            with progress_bar(len(files), "hashing (ray)", progress) as advance:
                yield from engine.hash_files(files, advance)
            return
        for path in progress_iter(files, "hashing", progress):
            try:
                yield (path, *hash_and_size(path), None)
            except OSError as e:
                yield path, None, None, error_text(e)

    def _record_images(self, files: list[str], res: AddResult, progress: bool, engine=None) -> set[int]:
        """Insert rows for new content; same bytes already present (any path) are skipped."""
        st = self.storage
        by_path, by_hash = st.image_index()
        errs = st.read_table("errors", ["path", "hash"])
        bad = set(zip(errs.column("path").to_pylist(), errs.column("hash").to_pylist())) if errs is not None else set()
        known_hashes = set(by_hash)
        rows, replaced = [], []
        for path, h, size, err in self._hashed(files, progress, engine):
            if err is not None:
                self._record_error(path, err, None)
                res.errors += 1
                res.error_list.append(ImageError(path=path, error=err))
                continue
            if h in known_hashes:
                res.skipped_duplicates += 1
                if h not in by_hash:  # a copy of content new in this add: shares its fate if it fails
                    res.copies.setdefault(h, []).append(path)
                continue
            if (path, h) in bad:  # failed before with these very bytes: not retried
                res.skipped_known_errors += 1
                continue
            if path in by_path:  # same path, new bytes: the old image is replaced
                replaced.append(by_path[path])
            known_hashes.add(h)
            rows.append({"path": path, "hash": h, "size": size, "added": now()})
        if replaced:
            res.labels_dropped = self._labeled_paths(replaced)
            st.delete_ids_everywhere(replaced)
            res.replaced = len(replaced)
        if not rows:
            return set()
        start = st.reserve_ids(len(rows))  # a kill after this never reuses the ids
        for i, r in enumerate(rows):
            r["id"] = start + i
        for i in range(0, len(rows), 5000):
            st.add_rows("images", rows[i : i + 5000])
        return {r["id"] for r in rows}

    def _labeled_paths(self, ids: Sequence[int]) -> list[str]:
        """Paths of the images among `ids` that carry a label (it goes when the image is replaced)."""
        t = self.storage.read_ids("labels", ids, ["id"])
        labeled = set() if t is None else set(t.column("id").to_pylist())
        return sorted(self.storage.paths_for(sorted(labeled)).values()) if labeled else []

    # ---- embedding ------------------------------------------------------------------------------
    def pending(self, version: str) -> list[tuple[int, str]]:
        """Images with no vector in `version`, in id order."""
        imgs = self.storage.read_table("images", ["id", "path"])
        if imgs is None or imgs.num_rows == 0:
            return []
        have = set(self.storage.vector_ids(version).tolist())
        pairs = sorted(zip(imgs.column("id").to_pylist(), imgs.column("path").to_pylist()))
        return [(i, p) for i, p in pairs if i not in have]

    def embed_pending(
        self,
        version: str,
        pending: Sequence[tuple[int, str]] | None = None,
        res: AddResult | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        gpu_decode: bool = False,
        engine=None,
    ) -> AddResult:
        """Embed `pending` (default: everything `version` lacks) into `version`'s table; call under the lock.

        Unreadable files are recorded in the errors table; an image that never got a vector in any
        version is removed again (it was not really added)."""
        res = res if res is not None else AddResult()
        pending = self.pending(version) if pending is None else list(pending)
        if not pending:
            return res
        st = self.storage
        bb = self.backbone_for(version)
        device = self.device()
        stats = EmbedStats()
        buf_ids: list[np.ndarray] = []
        buf_vecs: list[np.ndarray] = []

        def flush():
            if buf_ids:
                st.add_vectors(version, np.concatenate(buf_ids), np.concatenate(buf_vecs))
                buf_ids.clear()
                buf_vecs.clear()

        paths = dict(pending)  # for error rows
        every = COMMIT_EVERY if engine is None else engine.commit_every
        with progress_bar(len(pending), f"embedding ({device if engine is None else engine.name})", progress) as advance:
            buffered = 0
            batches = embed_items(
                bb, pending, device=device, batch_size=batch_size, workers=workers, progress=advance, stats=stats,
                gpu_decode=gpu_decode,
            ) if engine is None else engine.embed(bb, pending, progress=advance, stats=stats)
            for ids, vecs, bad in batches:
                if len(ids):
                    buf_ids.append(ids)
                    buf_vecs.append(vecs)
                    buffered += len(ids)
                if bad:
                    flush()
                    buffered = 0
                    self._failed(version, bad, paths, res)
                if buffered >= every:
                    flush()
                    buffered = 0
            flush()
        res.embed_seconds = stats.seconds
        res.batch_size, res.device = stats.batch_size, stats.device
        return res

    def _failed(self, version: str, bad: list[tuple[int, str]], paths: dict[int, str], res: AddResult) -> None:
        """Record unreadable images; drop those that have no vector anywhere (their labels go with them)."""
        st = self.storage
        ids = [i for i, _ in bad]
        hashes = st.hashes_for(ids)
        for id_, err in bad:
            copies = res.copies.pop(hashes.get(id_), [])  # same bytes under other paths: just as unreadable
            for path in [paths[id_], *copies]:
                self._record_error(path, err, hashes.get(id_))
                res.error_list.append(ImageError(path=path, error=err, id=id_ if path == paths[id_] else None))
            res.errors += 1 + len(copies)
            res.skipped_duplicates -= len(copies)
        if version == st.active_version and not self._has_other_vectors(ids, version):
            st.delete_ids_everywhere(ids)  # never embedded: the image was not really added

    def _has_other_vectors(self, ids: Sequence[int], version: str) -> bool:
        """Whether any of `ids` has a vector in another version (then its labels must survive a bad re-read)."""
        return any(self.storage.count(vectors_table_name(v), id_in(ids)) for v in self.storage.versions if v != version)

    def _record_error(self, path: str, error: str, hash_: str | None) -> None:
        t = self.storage.table("errors", create=True)
        t.delete(f"path = {sql_str(path)}")
        self.storage.add_rows("errors", [{"path": path, "hash": hash_, "error": error, "time": now()}])

    def _vectors_changed(self) -> None:
        st = self.storage
        st.compact(vectors_table_name(st.active_version))
        st.compact("images")
        self.on_vectors_changed(st.active_version)

    # ---- remove / errors ------------------------------------------------------------------------
    def remove(self, ids: Sequence[int], unknown: Sequence[str] = ()) -> RemoveResult:
        """Remove images (their vectors in every version, labels, predictions) by id; `unknown` (items the
        caller could not find in the store) is passed through to the result."""
        st = self.storage
        ids = [int(i) for i in ids]
        res = RemoveResult(removed=0, unknown=list(unknown))
        if ids:
            with st.write_lock():
                res.removed = st.delete_ids_everywhere(ids)
                self._vectors_changed()
        return res

    def errors(self) -> list[ImageError]:
        t = self.storage.read_table("errors")
        return [] if t is None else [ImageError(path=r["path"], error=r["error"], time=str(r["time"])) for r in t.to_pylist()]
