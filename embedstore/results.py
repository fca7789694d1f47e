"""Typed results: what the Store's methods return (dataclasses, not dicts).

Every result has `to_dict()` (JSON-ready: what `--json` prints). Fields are documented here once;
cli/ and ui/ read attributes, never string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Result:
    """Base of the result dataclasses: `to_dict()` for JSON."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.repr}


def _plain(v: Any) -> Any:
    if isinstance(v, Result):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


class ListsUnknown:
    """For results that name the items given that are not in the store (`unknown`): their count too."""

    unknown: list[str]

    @property
    def unknown_count(self) -> int:
        return len(self.unknown)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "unknown_count": self.unknown_count}


# ---- ingest ---------------------------------------------------------------------------------------
@dataclass
class VectorSet:
    """ids (N,), paths (N,), vectors (N, D) float32 L2-normalised of one version — for users' own analysis."""

    ids: np.ndarray
    paths: list[str]
    vectors: np.ndarray
    version: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):  # ids, paths, X = store.vectors()
        return iter((self.ids, self.paths, self.vectors))


@dataclass
class ImageError(Result):
    """A file that could not be added: its id (None when it never got one), path and the reason."""

    path: str
    error: str
    id: int | None = None
    time: str | None = None


@dataclass
class AddResult(Result):
    added: int = 0  # new images embedded
    skipped_duplicates: int = 0  # same bytes already in the store (any path)
    skipped_known_errors: int = 0  # failed before with these very bytes: not retried
    replaced: int = 0  # same path, new bytes: the old image was replaced
    resumed: int = 0  # images of an earlier, interrupted run embedded now
    errors: int = 0
    error_list: list[ImageError] = field(default_factory=list)
    missing_paths: list[str] = field(default_factory=list)
    labels_dropped: list[str] = field(default_factory=list)  # paths whose label went: same path, new bytes
    seconds: float = 0.0
    embed_seconds: float = 0.0
    batch_size: int = 0
    device: str = "cpu"
    copies: dict[str, list[str]] = field(default_factory=dict, repr=False)  # hash -> other paths of new content (internal)

    @property
    def images_per_second(self) -> float:
        n = self.added + self.resumed
        return n / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("embed_seconds")
        d["seconds"] = round(self.seconds, 3)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d


@dataclass
class RemoveResult(ListsUnknown, Result):
    removed: int  # images removed (with their vectors, labels and predictions)
    unknown: list[str] = field(default_factory=list)  # items given that are not in the store


# ---- store ------------------------------------------------------------------------------------------
@dataclass
class IndexInfo(Result):
    """The FAISS index of the active version as its sidecar describes it."""

    factory: str | None
    kind: str | None
    auto: bool | None
    vectors: int
    params: dict | None
    recall_at_10: float | None
    built: str | None
    fresh: bool  # matches the vectors table (no update pending)


@dataclass
class StoreInfo(Result):
    """Counts and the active backbone (never loads a model)."""

    path: str
    images: int
    vectors: int
    backbone: str
    weights: str | None
    version: str
    dim: int
    text: bool
    errors: int
    versions: int
    index: IndexInfo | None
    labels: int
    classes: int
    predictions: int
    finetuned_versions: int
    unfinished_versions: list[str]
    tables: str | None = None  # where the LanceDB tables live when not in STORE/lance (object storage)


# ---- search -----------------------------------------------------------------------------------------
@dataclass
class Hit(Result):
    id: int
    path: str
    score: float  # cosine similarity to the query
    label: str | None = None  # the image's label, if any
    prediction: str | None = None  # its persisted prediction, if any


@dataclass
class DuplicatePair(Result):
    id_a: int
    path_a: str
    id_b: int
    path_b: str
    score: float


@dataclass
class IndexSummary(Result):
    """A freshly built index."""

    factory: str
    kind: str
    auto: bool
    vectors: int
    dim: int
    params: dict
    recall_at_10: float | None
    seconds: dict | None
    gpu: bool
    path: str
    streamed: bool = False  # built batch by batch from the table (bounded memory; see search/streaming_index.py)


# ---- labels -----------------------------------------------------------------------------------------
@dataclass
class LabelResult(ListsUnknown, Result):
    labeled: int  # images whose label changed (new or relabeled)
    relabeled: int  # of those, images that had another class
    unchanged: int
    new_classes: list[str]
    ids: list[int]
    unknown: list[str] = field(default_factory=list)  # items not in the store (never dropped silently)
    label: str | None = None  # the class (single-class labeling)
    per_class: dict[str, int] | None = None  # labels written per class (CSV / folders)
    source_file: str | None = None  # the CSV file or class-folder root read
    skipped_rows: int = 0  # CSV rows skipped for an empty path or label

    @property
    def new_class(self) -> bool:
        return bool(self.new_classes)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "new_class": self.new_class}


@dataclass
class UnlabelResult(ListsUnknown, Result):
    unlabeled: int
    unknown: list[str] = field(default_factory=list)


@dataclass
class Neighbor(Result):
    """A labeled image close to the one explained."""

    id: int
    path: str
    label: str
    similarity: float


@dataclass
class Prediction(Result):
    id: int
    path: str
    label: str | None  # None: unknown (confidence below the threshold)
    confidence: float  # calibrated top probability x familiarity (see labels/classify.py)
    head: str
    probability: float | None = None  # the calibrated top probability alone
    explain: dict | None = None  # with explain=True: {neighbors: [Neighbor], prompt_scores (CLIP only)}


@dataclass
class ClassSummary(Result):
    count: int
    mean_confidence: float | None


@dataclass
class ClassifyResult(Result):
    head: str  # the head asked for
    chosen: str  # what actually predicted (auto's choice, or the head)
    reason: str  # why that head (auto explains its choice)
    version: str
    classes: list[str]
    n_labels: int
    threshold: float | None
    predictions: list[Prediction]
    per_class: dict[str, ClassSummary]
    unknown: int
    seconds: float
    skipped: int = 0  # images left out: no vector in the version (an interrupted add)
    skipped_reason: str | None = None  # why, and what to run
    predicted: int | None = None  # --engine ray: predictions written (the list holds the least confident only)


@dataclass
class Explanation(Result):
    id: int
    path: str
    label: str | None
    prediction: dict | None  # {label, confidence, head} when persisted
    neighbors: list[Neighbor]
    class_similarity: dict[str, dict]  # class -> {nearest, centroid}
    prompt_scores: dict | None  # CLIP only: class -> {similarity, probability}


@dataclass
class Suggestion(Result):
    id: int
    path: str
    score: float
    reason: str
    prediction: str | None
    margin: float | None
    nearest_similarity: float | None


@dataclass
class ExportResult(Result):
    format: str
    out: str
    rows: int
    per_class: dict[str, int]
    unknown: int
    files: int | None = None  # imagefolder: files written
    missing: list[str] | None = None  # imagefolder: source files no longer on disk
    linked: bool | None = None


@dataclass
class EvalRun(Result):
    """One few-shot evaluation: per head and shot count, mean/std accuracy over episodes."""

    run_id: str
    time: str
    version: str
    n_labels: int
    n_classes: int
    class_counts: dict[str, int]
    episodes: int
    seed: int
    shots: list[int]
    heads: dict[str, dict[str, dict]]  # head -> "shots" -> {mean, std, episodes}
    errors: dict[str, str]
    chosen: dict[str, dict[str, int]]  # auto's picks per shot count
    classes: list[str]
    best_head: str | None
    best_accuracy: float | None
    best_shots: int
    confusion: dict | None  # {head, shots, classes, matrix (rows true, columns predicted)}
    mean_accuracy: dict[str, float]
    seconds: float
    # auto fitted on all the labels: its estimated accuracy on the unlabeled images, with stderr/low/high
    # (evaluate.estimate_unlabeled); None when a class has a single label
    unlabeled_estimate: dict | None = None
    n_scored: int | None = None  # labels tested on (not trained on by a fine-tuned backbone); None in older runs

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRun":
        """From a stored run's JSON (runs stored by older versions may lack newer fields: None)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def estimate_line(self) -> str:
        """One sentence on auto's expected accuracy on the unlabeled images, its interval and when it probably reads
        low (the CLI and the UI print it), or why there is none."""
        est = self.unlabeled_estimate
        if not est:
            from embedstore.labels.heads.auto import MIN_SCORED

            unseen = f" that this version's fine-tuned backbone did not train on ({self.n_scored} now)" if self._left_out() else ""
            return ("no estimate for the unlabeled images yet: it needs labels to hold out, at least 2 per class and "
                    f"{MIN_SCORED} in all{unseen}")
        caveat = (f"; your labels look harder than the collection (held-out confidence {est['labels_confidence']:.2f} vs "
                  f"{est['mean_confidence']:.2f} on the unlabeled images), as when suggest chose them, so it probably reads low"
                  if est.get("harder_labels") else "")
        return (f"expected on the unlabeled images: {est['head']} {est['accuracy']:.3f} "
                f"(95% {est['low']:.3f}-{est['high']:.3f}; its confidence there, calibrated on the labels weighted by the images each "
                f"stands for, checked against its held-out accuracy on them{caveat})")

    def _left_out(self) -> bool:
        """Whether eval left labels a fine-tuned backbone trained on out of its tests."""
        return self.n_scored is not None and self.n_scored < self.n_labels

    def tested_on(self) -> str:
        """What the curve was measured on, e.g. "100 labels / 10 classes, tested on the 20 the fine-tuned backbone
        did not train on"."""
        out = f"{self.n_labels} labels / {self.n_classes} classes"
        if self._left_out():
            out += f", tested on the {self.n_scored} the fine-tuned backbone did not train on"
        return out

    def curve_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the learning curve: one row per head (best first), one column per shot count."""
        header = ["head"] + [f"{s}-shot" for s in self.shots] + ["mean"]
        rows = []
        for h, d in sorted(self.heads.items(), key=lambda kv: -self.mean_accuracy[kv[0]]):
            rows.append(
                [h] + [f"{d[str(s)]['mean']:.3f} ±{d[str(s)]['std']:.3f}" for s in self.shots] + [f"{self.mean_accuracy[h]:.3f}"]
            )
        return header, rows


# ---- loop -------------------------------------------------------------------------------------------
@dataclass
class PlateauResult(Result):
    plateau: bool
    reason: str
    gain: float | None
    margin: float
    window: int
    points: list[dict]  # [{n_labels, accuracy, estimate}] of the learning curve read (estimate: None when eval had none)
    version: str | None = None


@dataclass
class FinetuneResult(Result):
    """status: activated | kept | not-improved | too-few-labels | skipped; `message` says why."""

    status: str
    version: str | None
    parent: str
    active: str
    method: str
    message: str
    resumed: bool = False
    activated: bool = False
    plateau: PlateauResult | None = None
    train: dict | None = None  # the training record (epochs, history, seconds, config)
    reembedded: int = 0
    errors: int = 0
    vectors: int = 0
    images: int = 0
    embed_seconds: float = 0.0
    index: IndexSummary | dict | None = None  # dict {error} when the index could not be built
    holdout: dict | None = None  # {parent: {...}, new: {...}} the activation check
    eval: dict | None = None  # {best_head, best_accuracy} with evaluate=True
    # the activation decision (loop/decide.py): {estimate (new - old best-head accuracy on decision labels
    # never trained or selected on), low, high (80% paired-bootstrap interval), se, margin, n, old, new,
    # activate, reason, compared, min_decide, max_forgetting}
    decision: dict | None = None
    forgetting: dict | None = None  # {k, n, recall_old, recall_new, drop, neighbour_overlap} (loop/forgetting.py)
    warnings: list = field(default_factory=list)


@dataclass
class VersionRow(Result):
    version: str
    active: bool
    created: str | None
    parent: str | None
    backbone: str
    method: str | None
    status: str
    vectors: int
    eval_accuracy: float | None  # the latest eval run's best-head accuracy
    eval_n_labels: int | None
    holdout_accuracy: float | None  # fine-tuned versions: the activation check


@dataclass
class UseResult(Result):
    version: str
    previous: str
    embedded: int
    vectors: int


@dataclass
class PruneResult(Result):
    pruned: str
    files: list[str]
