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
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from embedstore.errors import BackboneMismatchError, StoreNotFoundError
from embedstore.ingest.backbones import DEFAULT_BACKBONE, load_backbone, parse_name
from embedstore.ingest.backbones.base import Backbone, file_digest
from embedstore.ingest.ingest import IngestService
from embedstore.ingest.pipeline import resolve_device
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
    ) -> "Store":
        root = Path(path).expanduser().resolve()
        if Storage.exists(root):
            store = cls(Storage.load(root, lock_timeout), device)
            store._check_backbone_request(backbone, weights)
            return store
        Storage.check_free(root)
        if not create:
            raise StoreNotFoundError(f"no store at {root}; create one with: embedstore add {path} IMAGES...")
        name = backbone or DEFAULT_BACKBONE
        parse_name(name)  # fail on a bad name before touching the disk
        bb = load_backbone(name, weights, device=resolve_device(device))
        store = cls(Storage.create(root, bb.describe(), bb.version, lock_timeout), device)
        store._backbones[bb.version] = bb
        return store

    def _check_backbone_request(self, backbone: str | None, weights: str | None) -> None:
        if backbone is None and weights is None:
            return
        active = self.version_info()
        same_name = backbone is None or str(parse_name(backbone)) == active["name"]
        same_weights = weights is None or (
            active.get("weights_id", "").endswith(file_digest(weights)) if Path(weights).is_file() else False
        )
        if not (same_name and same_weights):
            asked = backbone or active["name"]
            if weights:
                asked += f" with weights {weights}"
            raise BackboneMismatchError(
                f"store {self.root} holds vectors of {active['name']} (version {self.active_version}); "
                f"got {asked}. Omit --backbone/--weights to use the store's own, or create a new store"
            )

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
            bb = load_backbone(info["name"], self.storage.weights_file(version), device=self.device)
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
            progress: bool = True, gpu_decode: bool = False) -> AddResult:
        """Add image files/folders: dedup by content hash, embed new images, commit in batches (kill-safe)."""
        return self.ingest.add(paths, batch_size=batch_size, workers=workers, progress=progress, gpu_decode=gpu_decode)

    def pending_images(self, version: str | None = None) -> list[tuple[int, str]]:
        """Images with no vector in `version` (default: the active one), in id order."""
        return self.ingest.pending(version or self.active_version)

    def remove(self, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None) -> int:
        """Remove images (their vectors in every version, labels, predictions) by id or path."""
        return self.ingest.remove(ids or (), paths or ())

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

    def build_index(self, factory: str | None = None, gpu: bool | None = None, progress: bool = True) -> IndexSummary:
        """(Re)build the active version's FAISS index now (factory=None chooses by size)."""
        return self.searching.build_index(factory, gpu, progress)

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
                 ids: Sequence[int] | None = None, k_explain: int = 3, persist: bool = True, **head_kw) -> ClassifyResult:
        """Fit `head` on the labels, predict every unlabeled image (or `ids`), persist the predictions."""
        return self.classifying.classify(head, threshold, explain, ids, k_explain, persist, **head_kw)

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

    def finetune(self, method: str = "lora", epochs: int | None = None, if_plateau: bool = False, progress: bool = True,
                 **kw) -> FinetuneResult:
        """Fine-tune the active backbone on the labels; make, embed, index and maybe activate a new version."""
        return self.loop.finetune(method, epochs, if_plateau, progress, **kw)

    def versions(self) -> list[VersionRow]:
        return self.loop.versions()

    def use(self, version: str, progress: bool = False) -> UseResult:
        return self.loop.use(version, progress)

    def prune(self, version: str) -> PruneResult:
        return self.loop.prune(version)
