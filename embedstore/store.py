"""The Store: one facade over the storage core and the stage services.

    Store ─┬─ Storage          storage.py: the directory (manifest, lock, LanceDB tables, file names)
           ├─ IngestService    ingest/ingest.py: add, remove, pending, errors (+ ingest/pipeline.py, backbones/)
           ├─ SearchService    search/search.py: search, duplicates, build_index (+ index_cache.py, faiss_index.py)
           ├─ LabelService     labels/labels.py: label, unlabel, labels, classes
           ├─ ClassifyService  labels/classify.py: classify, explain, suggest, evaluate, export (+ heads/)
           └─ LoopService      loop/versions.py: plateau, finetune, versions, use, prune (+ finetune.py)

Each service receives the storage core and `backbone_for(version)` (the backbone of a version, loaded
once and cached here); none imports this module and none reaches into another's state. The facade
opens or creates the store, resolves backbones, wires the services and delegates each public method
in a line or two. Results are the dataclasses of results.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedstore.check import CheckResult, check_path, check_store
from embedstore.errors import (
    BackboneLoadError,
    InvalidArgumentError,
    BackboneMismatchError,
    EmptyInputError,
    StoreNotFoundError,
)
from embedstore.ingest.backbones import DEFAULT_BACKBONE, load_backbone, parse_name
from embedstore.ingest.backbones.base import Backbone, file_digest
from embedstore.ingest.ingest import IngestService
from embedstore.ingest.pipeline import resolve_device
from embedstore.ingest.ray_engine import make_engine
from embedstore.labels.classify import ClassifyService
from embedstore.labels.labels import LabelService
from embedstore.loop.versions import LoopService
from embedstore.results import (
    AddResult,
    ClassifyResult,
    DuplicatePair,
    EvalRun,
    Explanation,
    ExportResult,
    FinetuneResult,
    Hit,
    ImageError,
    IndexSummary,
    LabelResult,
    PlateauResult,
    PruneResult,
    RemoveResult,
    StoreInfo,
    Suggestion,
    UnlabelResult,
    UseResult,
    VectorSet,
    VersionRow,
)
from embedstore.search.index_cache import IndexCache
from embedstore.search.search import SearchService
from embedstore.storage import Storage, vectors_table_name


class Store:
    """An embedding store on disk. Create or open one with `embedstore.open(path, ...)`."""

    def __init__(self, storage: Storage, device: str = "auto"):
        self.storage = storage
        self.device_request = device
        self._backbones: dict[str, Backbone] = {}
        self._made: str | None = None  # "dir"/"contents" when open() created the store: a failed first add undoes it
        self.index = IndexCache(storage, gpu_default=device != "cpu")
        self.ingest = IngestService(storage, self.backbone_for, lambda: self.device, self.index.after_change)
        self.searching = SearchService(storage, self.backbone_for, self.index)
        self.labeling = LabelService(storage)
        self.classifying = ClassifyService(storage, self.backbone_for, self.labeling)
        self.loop = LoopService(storage, self.backbone_for, lambda: self.device, self.ingest, self.searching, self.classifying)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        backbone: str | None = None,
        weights: str | None = None,
        *,
        create: bool = True,
        device: str = "auto",
        lock_timeout: float = 30.0,
        tables: str | None = None,
    ) -> "Store":
        if re.match(r"(s3|gs|gcs|az|abfs|hdfs|https?):/", str(path)):  # s3://... (s3:/... once it went through Path)
            raise InvalidArgumentError(
                f"STORE must be a local folder (it holds the manifest, the write lock and the index cache), not "
                f"{str(path).replace(':/', '://', 1) if '://' not in str(path) else path}; "
                "to keep the tables on object storage create it with --tables s3://BUCKET/PREFIX (Python: tables=...)")
        root = Path(path).expanduser().resolve()
        if Storage.exists(root):
            store = cls(Storage.load(root, lock_timeout), device)
            store._check_backbone_request(backbone, weights)
            if tables and tables.rstrip("/") != store.storage.tables_uri:
                raise InvalidArgumentError(f"store {root} already keeps its tables at {store.storage.tables_uri}; "
                                           "leave --tables out, or pick a new STORE for another location")
            return store
        Storage.check_free(root)
        if not create:
            raise StoreNotFoundError(f"no store at {root}; create one with: embedstore add {path} IMAGES...")
        name = DEFAULT_BACKBONE if backbone is None else backbone
        parse_name(name)  # fail on a bad name ("" included) before touching the disk
        bb = load_backbone(name, weights, device=resolve_device(device))
        existed = root.exists()
        store = cls(Storage.create(root, bb.describe(), bb.version, lock_timeout, tables), device)
        store._backbones[bb.version] = bb
        store._made = "dir" if not existed else "contents"  # what a failed first add takes back
        return store

    def _check_backbone_request(self, backbone: str | None, weights: str | None) -> None:
        """Refuse another backbone or other weights than the store's; weights with the store's digest at a
        new path (the file was moved) are used from there on, and the manifest records the new path."""
        if backbone is None and weights is None:
            return
        active = self.version_info()
        same_name = backbone is None or str(parse_name(backbone)) == active["name"]
        digest = None
        if weights is not None:
            if not Path(weights).expanduser().is_file():
                raise BackboneLoadError(f"weights file not found: {weights}; pass an existing checkpoint to --weights")
            digest = "sha256:" + file_digest(Path(weights).expanduser())
        if same_name and (digest is None or active.get("weights_id") == digest):
            if digest is not None:
                self._use_weights_file(str(Path(weights).expanduser().resolve()), digest)
            return
        asked = backbone or active["name"]
        if weights:
            asked += f" with weights {weights} ({digest[:19]}...; the store's are {str(active.get('weights_id'))[:19]}...)"
        raise BackboneMismatchError(
            f"store {self.root} holds vectors of {active['name']} (version {self.active_version}); "
            f"got {asked}. Omit --backbone/--weights to use the store's own, or create a new store"
        )

    def _use_weights_file(self, path: str, digest: str) -> None:
        """Point every version whose weights have `digest` (and live outside the store) at `path`; saved in
        the manifest under the write lock, or for this session only when the store cannot be written now."""

        def stale(manifest: dict) -> list[str]:
            return [v for v, e in manifest["versions"].items() if e.get("weights_id") == digest
                    and e.get("weights") and os.path.isabs(e["weights"]) and e["weights"] != path]

        if not stale(self.manifest):
            return
        try:
            with self.write_lock(timeout=5.0):  # re-reads the manifest
                for v in stale(self.manifest):
                    self.manifest["versions"][v]["weights"] = path
                self.storage.write_manifest()
        except OSError:  # read-only or busy store (StoreNotWritableError, StoreLockedError): this session only
            for v in stale(self.manifest):
                self.manifest["versions"][v]["weights"] = path
        self._backbones.clear()

    # ---- the storage core ----------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.storage.root

    @property
    def manifest(self) -> dict:
        return self.storage.manifest

    @property
    def active_version(self) -> str:
        return self.storage.active_version

    def version_info(self, version: str | None = None) -> dict:
        return self.storage.version_info(version)

    def reload_manifest(self) -> None:
        self.storage.reload_manifest()

    def write_lock(self, timeout: float | None = None):
        """Exclusive write lock across processes (re-entrant); see Storage.write_lock."""
        return self.storage.write_lock(timeout)

    def data_versions(self) -> dict[str, int | None]:
        """Versions of the active vectors, labels, predictions and images tables: keys for caches (the UI's)."""
        return self.storage.data_versions()

    # ---- backbones -----------------------------------------------------------------------
    @property
    def device(self) -> str:
        return resolve_device(self.device_request)

    def backbone_for(self, version: str) -> Backbone:
        """The backbone of `version`, loaded on first use and cached (info() never loads a model)."""
        bb = self._backbones.get(version)
        if bb is None:
            info = self.version_info(version)
            wf = self.storage.weights_file(version)
            if wf is not None and not os.path.isfile(wf):
                raise BackboneLoadError(
                    f"the weights file of version {version} ({info['name']}), {wf}, is missing (moved or deleted); "
                    + ("pass its new location with --weights NEW_PATH (in Python: embedstore.open(STORE, "
                       "weights=NEW_PATH)); the file's sha256 must match the store's" if os.path.isabs(info["weights"])
                       else "restore it from a backup, or switch versions with `embedstore use`")
                )
            bb = load_backbone(info["name"], wf, device=self.device)
            if bb.version != version:
                raise BackboneMismatchError(
                    f"backbone {info['name']} now loads as version {bb.version}, but the store's vectors are "
                    f"version {version} (weights or preprocessing changed); restore the original "
                    "weights or re-create the store"
                )
            self._backbones[version] = bb
        return bb

    @property
    def backbone(self) -> Backbone:
        """The active version's backbone."""
        return self.backbone_for(self.active_version)

    # ---- ingest --------------------------------------------------------------------------
    def add(self, paths: Iterable[str | os.PathLike], *, batch_size: int | None = None, workers: int | None = None,
            progress: bool = True, gpu_decode: bool = False, engine: str = "local", address: str | None = None,
            num_gpus_per_worker: float = 0.0) -> AddResult:
        """Add image files/folders/URIs (s3://bucket/prefix/): dedup by content hash, embed new images, commit in
        batches (kill-safe). engine="ray": hashing and embedding run on a Ray cluster (`address`: None = a local
        Ray, "auto" = the running cluster), `workers` embedding actors with `num_gpus_per_worker` GPUs each.

        When the first add into a store that open() just created finds no image to add (a missing folder,
        one without images), the store is taken back, so a retry may choose another backbone. (Files that
        are there but unreadable keep the store: its errors table remembers them.)"""
        made, self._made = self._made, None  # only the first add may take the store back
        try:
            eng = make_engine(engine, address=address, workers=workers, gpus_per_worker=num_gpus_per_worker,
                              batch_size=batch_size)
            return self.ingest.add(paths, batch_size=batch_size, workers=workers, progress=progress, gpu_decode=gpu_decode,
                                   engine=eng)
        except (EmptyInputError, InvalidArgumentError):  # discard() keeps a store that holds images or labels
            if made is not None:
                self.storage.discard(made)
            raise

    def pending_images(self, version: str | None = None) -> list[tuple[int, str]]:
        """Images with no vector in `version` (default: the active one), in id order."""
        return self.ingest.pending(version or self.active_version)

    def remove(self, items: Iterable = (), *, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None,
               base: str | os.PathLike | None = None) -> RemoveResult:
        """Remove images (their vectors in every version, labels, predictions) named by ids, paths or folders
        (the files on disk are not touched); items not in the store are listed in `unknown`."""
        items = [*items, *(int(i) for i in (ids if ids is not None else ())), *(paths or ())]
        if not items:
            raise EmptyInputError("nothing to remove; pass image paths, folders or ids")
        return self.ingest.remove(*self.labeling.resolve_items(items, base))

    def errors(self) -> list[ImageError]:
        return self.ingest.errors()

    # ---- reading -------------------------------------------------------------------------
    def vectors(self, version: str | None = None, ids: Sequence[int] | None = None) -> VectorSet:
        """ids, paths and an (N, D) float32 array of the active (or given) version, in id order."""
        return self.storage.vectors(version, ids)

    def vector_ids(self, version: str | None = None) -> np.ndarray:
        """Sorted ids of the images that have a vector in `version` (default: the active one)."""
        return self.storage.vector_ids(version)

    def paths_for(self, ids: Sequence[int]) -> list[str]:
        """The path of each id ("" for ids not in the store)."""
        lookup = self.storage.paths_for(ids)
        return [lookup.get(int(i), "") for i in ids]

    def count_images(self) -> int:
        return self.storage.count("images")

    def info(self) -> StoreInfo:
        """Counts and the active backbone; never loads a model."""
        st, v = self.storage, self.version_info()
        versions = st.versions
        return StoreInfo(
            path=str(self.root), images=self.count_images(), vectors=st.count(vectors_table_name(self.active_version)),
            backbone=v["name"], weights=v.get("weights"), version=self.active_version, dim=v["dim"],
            text=v.get("text", False), errors=st.count("errors"), versions=len(versions),
            index=self.index.info(self.active_version), labels=st.count("labels"), classes=len(self.labeling.classes()),
            predictions=st.count("predictions"), finetuned_versions=sum(1 for e in versions.values() if e.get("parent")),
            unfinished_versions=[k for k, e in versions.items() if e.get("status") == "embedding"],
            tables=st.tables_uri if st.remote else None,
        )

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, version={self.active_version})"

    # ---- search --------------------------------------------------------------------------
    def search(self, image=None, text: str | None = None, id: int | None = None, vector=None,  # noqa: A002
               k: int = 10, where: str | None = None) -> list[Hit]:
        """Nearest images to one query (an image path/PIL, a text, a stored id or a vector); see SearchService.search."""
        return self.searching.search(image=image, text=text, id=id, vector=vector, k=k, where=where)

    def search_vectors(self, Q, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Batch search: Q (N, D) -> (scores (N, k), ids (N, k)), padded with id -1."""
        return self.searching.search_vectors(Q, k)

    def build_index(self, factory: str | None = None, gpu: bool | None = None, progress: bool = True,
                    stream: bool | None = None) -> IndexSummary:
        """(Re)build the active version's FAISS index now (factory=None chooses by size; stream=True: batch by batch
        from the table, bounded memory; None: when the vectors take 4 GiB or more)."""
        return self.searching.build_index(factory, gpu, progress, stream=stream)

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[DuplicatePair]:
        """Pairs of distinct images with cosine similarity >= threshold, best first."""
        return self.searching.duplicates(threshold, k)

    # ---- labels --------------------------------------------------------------------------
    def resolve_items(self, items: Iterable, base: str | os.PathLike | None = None) -> tuple[list[int], list[str]]:
        """Image ids for ids/paths/folders (copies found by content), and the items not in the store."""
        return self.labeling.resolve_items(items, base)

    def label(self, items: Iterable, cls: str, source: str = "human", base: str | os.PathLike | None = None) -> LabelResult:
        """Give class `cls` to images (ids or paths); relabels images that had another class."""
        return self.labeling.label(items, cls, source, base)

    def label_many(self, pairs: Iterable[tuple], source: str = "human", base: str | os.PathLike | None = None) -> LabelResult:
        return self.labeling.label_many(pairs, source, base)

    def label_csv(self, path: str | os.PathLike, source: str = "human") -> LabelResult:
        """Labels from a CSV with columns path,label (paths absolute or relative to the CSV's folder)."""
        return self.labeling.label_csv(path, source)

    def label_folders(self, root: str | os.PathLike, source: str = "human") -> LabelResult:
        """Labels from an ImageFolder layout ROOT/<class>/<image>."""
        return self.labeling.label_folders(root, source)

    def unlabel(self, items: Iterable = (), cls: str | None = None, base: str | os.PathLike | None = None) -> UnlabelResult:
        return self.labeling.unlabel(items, cls, base)

    def labels(self, source: str | None = "human") -> dict[int, str]:
        """{image id: class} of current labels (human ones by default; source=None for all)."""
        return self.labeling.labels(source)

    def labels_table(self) -> pa.Table:
        return self.labeling.labels_table()

    def classes(self) -> list[str]:
        return self.labeling.classes()

    def class_counts(self) -> dict[str, int]:
        return self.labeling.class_counts()

    # ---- classification ------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.classifying.has_text()

    def make_head(self, head: str = "auto", **kw):
        return self.classifying.make_head(head, **kw)

    def fit_head(self, head: str = "auto", **kw):
        """Fit `head` on the labels: (head, VectorSet, labeled positions, unlabeled positions)."""
        return self.classifying.fit_head(head, **kw)

    def classify(self, head: str = "auto", threshold: float | None = None, explain: bool = False,
                 ids: Sequence[int] | None = None, k_explain: int = 3, persist: bool = True, *, engine: str = "local",
                 address: str | None = None, **head_kw) -> ClassifyResult:
        """Fit `head` on the labels, predict every unlabeled image (or `ids`), persist the predictions.
        engine="ray": predicted in Ray tasks over the vectors table, written in chunks (classify_ray.py)."""
        return self.classifying.classify(head, threshold, explain, ids, k_explain, persist,
                                         engine=make_engine(engine, address=address), **head_kw)

    def predictions(self) -> pa.Table:
        return self.classifying.predictions()

    def explain(self, id: int | str, k: int = 5) -> Explanation:  # noqa: A002
        return self.classifying.explain(id, k)

    def suggest(self, n: int = 24, **kw) -> list[Suggestion]:
        return self.classifying.suggest(n, **kw)

    def evaluate(self, shots: Sequence[int] = (1, 2, 4, 8, 16), episodes: int = 10, heads=None, **kw) -> EvalRun:
        return self.classifying.evaluate(shots, episodes, heads, **kw)

    def eval_history(self, version: str | None = None) -> list[EvalRun]:
        return self.classifying.eval_history(version)

    def export(self, fmt: str, out: str | os.PathLike, **kw) -> ExportResult:
        return self.classifying.export(fmt, out, **kw)

    # ---- loop ----------------------------------------------------------------------------
    def plateau(self, margin: float | None = None, window: int | None = None, version: str | None = None) -> PlateauResult:
        return self.loop.plateau(margin, window, version)

    def finetune(self, method: str = "last-blocks", epochs: int | None = None, if_plateau: bool = False, progress: bool = True,
                 **kw) -> FinetuneResult:
        """Fine-tune the active backbone on the labels; make, embed, index and maybe activate a new version."""
        return self.loop.finetune(method, epochs, if_plateau, progress, **kw)

    def versions(self) -> list[VersionRow]:
        return self.loop.versions()

    def use(self, version: str, progress: bool = False) -> UseResult:
        return self.loop.use(version, progress)

    def prune(self, version: str) -> PruneResult:
        return self.loop.prune(version)

    # ---- integrity -----------------------------------------------------------------------
    def check(self, repair: bool = False) -> CheckResult:
        """Verify the whole store (manifest, tables, vectors, labels, index checksums, weights, temp files); with
        repair=True fix what is safe (embedstore/check.py lists what)."""
        return check_store(self.storage, self.index, repair)

    @staticmethod
    def check_path(path: str | os.PathLike, repair: bool = False) -> CheckResult:
        """`check` for a store that may not open (a damaged manifest): what `embedstore check` runs."""
        return check_path(path, repair)
