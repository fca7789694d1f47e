"""Fine-tuning data: the stratified hold-out split, image loaders with augmentation, where batches run
(device, autocast), and the two batch sources: whole images every epoch, or cached outputs of the frozen
prefix."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from embedstore.errors import EmptyInputError

Batch = tuple[torch.Tensor, torch.Tensor]


def split_holdout(ids: Sequence[int], y: Sequence[str], frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified split: round(frac * n) of each class held out, at least 1 when the class has 2+ images."""
    if frac <= 0:
        return sorted(int(i) for i in ids), []
    rng = np.random.default_rng(seed)
    train, hold = [], []
    by_class: dict[str, list[int]] = {}
    for i, c in zip(ids, y):
        by_class.setdefault(c, []).append(int(i))
    for c in sorted(by_class):
        members = sorted(by_class[c])
        rng.shuffle(members)
        k = max(1, int(round(frac * len(members)))) if len(members) >= 2 else 0
        hold += members[:k]
        train += members[k:]
    return sorted(train), sorted(hold)


# ---- labels --------------------------------------------------------------------------------
@dataclass
class Labels:
    """The labelled items, split into a training fold and a held-out fold."""

    classes: list[str]
    by_id: dict[int, tuple[str, int]]  # id -> (path, class index)
    train_ids: list[int]
    hold_ids: list[int]

    def items(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        return [self.by_id[i] for i in ids]

    def targets(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.by_id[i][1] for i in ids])


def split_labels(items: Sequence[tuple[int, str, str]], cfg,
                  pseudo: Sequence[tuple[int, str, str]] = ()) -> Labels:
    """Check there is enough to train on and split (id, path, class) items into train / held-out folds;
    pseudo-labeled items only ever train (never select)."""
    ids = [int(i) for i, _, _ in items]
    y_names = [c for _, _, c in items]
    classes = sorted(set(y_names))
    if len(classes) < 2:
        raise EmptyInputError("fine-tuning needs labels of at least 2 classes; label more images first")
    train_ids, hold_ids = split_holdout(ids, y_names, cfg.holdout, cfg.seed)
    if (cfg.holdout > 0 and not hold_ids) or len(train_ids) < len(classes):
        raise EmptyInputError(
            f"too few labels to fine-tune ({len(ids)} over {len(classes)} classes); label at least 3 images per class"
        )
    cidx = {c: k for k, c in enumerate(classes)}
    by_id = {int(i): (p, cidx[c]) for i, p, c in items}
    extra = [(int(i), p, c) for i, p, c in pseudo if c in cidx and int(i) not in by_id]
    by_id.update({i: (p, cidx[c]) for i, p, c in extra})
    return Labels(classes, by_id, sorted(train_ids + [i for i, _, _ in extra]), hold_ids)


def class_centroids(labels: Labels, init_vectors: dict[int, np.ndarray], dim: int) -> np.ndarray:
    """The classifier's starting weights: unit class centroids of the frozen vectors of the training fold."""
    cent = np.zeros((len(labels.classes), dim), np.float32)
    for i in labels.train_ids:
        if i in init_vectors:  # human labels only: pseudo-labels do not move the start
            cent[labels.by_id[i][1]] += init_vectors[i]
    cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
    return cent


# ---- images --------------------------------------------------------------------------------
class _LabeledImages(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable, pre):
        self.items, self.tf, self.pre = list(items), transform, pre

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from embedstore.ingest.pipeline import load_image

        path, y = self.items[i]
        return self.tf(load_image(path, self.pre)), y


def image_transforms(pre, size: int, crop_scale: tuple[float, float], flip: bool, strong: bool = False):
    """(train, eval) transforms: RandomResizedCrop (+ flip, + TrivialAugmentWide when strong) for training,
    resize + center crop for eval."""
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    train = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=interp)]
    if flip:
        train.append(T.RandomHorizontalFlip())
    if strong:
        train.append(T.TrivialAugmentWide(interpolation=interp))
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    evaluate = [T.Resize(int(math.floor(size / pre.crop_pct)), interpolation=interp), T.CenterCrop(size)]
    return T.Compose(train + norm), T.Compose(evaluate + norm)


def image_loader(items, tf, pre, batch_size: int, shuffle: bool, device: str, seed: int):
    """A DataLoader over (path, class index) items; worker processes only on CUDA with enough images."""
    from embedstore.ingest.pipeline import _mp_context, _worker_init

    cuda = device.startswith("cuda")
    workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda and len(items) > 4 * batch_size else 0
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        _LabeledImages(items, tf, pre),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        pin_memory=cuda,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=bool(workers),
        multiprocessing_context=_mp_context() if workers else None,  # LanceDB is not fork-safe
    )


# ---- where batches run ---------------------------------------------------------------------
class DeviceRun:
    """The training device: channels_last placement, and bf16/fp16 autocast on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self.cuda else None

    def to_dev(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=self.cuda).contiguous(memory_format=torch.channels_last)

    def forward(self, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.cuda):
            return fn(x)


# ---- batch sources -------------------------------------------------------------------------
class StreamedBatches:
    """Augmented images through the whole network every epoch; `fwd` is the network."""

    def __init__(self, net: nn.Module, train_loader, hold_loader, dev: DeviceRun):
        self.fwd, self.train_loader, self.hold_loader, self.dev = net, train_loader, hold_loader, dev

    def train(self, epoch: int) -> Iterator[Batch]:
        return ((self.dev.to_dev(x), y) for x, y in self.train_loader)

    def hold(self) -> Iterator[Batch]:
        return ((self.dev.to_dev(x), y) for x, y in self.hold_loader)


class CachedBatches:
    """The frozen prefix's outputs, computed once for `views` augmented passes over the training images
    (and once for the held-out ones); epoch e trains the tail (`fwd`) on view (e - 1) % views."""

    def __init__(
        self, prefix: Callable, tail: nn.Module, plain_loader, hold_loader, y_train, y_hold, views: int, batch_size: int,
        dev: DeviceRun,
    ):
        self.fwd, self.ytr, self.yhold, self.views, self.bs, self.dev = tail, y_train, y_hold, views, batch_size, dev
        self.prefix = prefix
        self.cache = [self._encode(plain_loader) for _ in range(views)]
        self.hold_cache = self._encode(hold_loader) if len(y_hold) else None

    @torch.no_grad()
    def _encode(self, loader) -> torch.Tensor:
        dt = torch.float16 if self.dev.cuda else torch.float32
        return torch.cat([self.dev.forward(self.prefix, self.dev.to_dev(x)).to(dt) for x, _ in loader])

    def train(self, epoch: int) -> Iterator[Batch]:
        feats = self.cache[(epoch - 1) % self.views]
        perm = torch.randperm(len(self.ytr))
        for i in range(0, len(perm), self.bs):
            idx = perm[i : i + self.bs]
            yield feats[idx.to(feats.device)].float(), self.ytr[idx]

    def hold(self) -> Iterator[Batch]:
        if self.hold_cache is None:
            return
        for i in range(0, len(self.yhold), self.bs):
            yield self.hold_cache[i : i + self.bs].float(), self.yhold[i : i + self.bs]
