"""Adapt a backbone to the store's labels without forgetting what it knew.

Methods (all start from the active backbone's weights):
    lora         peft LoRA adapters on the Linear / Conv2d (non-depthwise) layers of the last blocks, L2
                 on the adapters (a pull toward the pretrained weights); merged into the weights at the end
    last-blocks  the last blocks unfrozen, L2-SP toward the pretrained weights (Li et al., 2018)
    full         every weight unfrozen, L2-SP, smaller learning rate

Self-training (loop/pseudo.py, on by default): unlabeled images that auto labels with confidence >= 0.9
join the training fold with that label (at most 2 per training label of the class); measured on digits at
16 labels per class it roughly doubled the fine-tune's gain (benchmarks/RESULTS.md).
During training a cosine classifier sits on top of the pooled features, initialised from the class
centroids of the frozen vectors (so step 0 is already the centroid head); it is discarded afterwards:
the store keeps only the backbone. BatchNorm statistics stay frozen (eval mode): few images make poor
batch statistics. Augmentation: RandomResizedCrop + horizontal flip (augment="strong": + TrivialAugmentWide);
flips only when mirrored labeled images stay as recognisable as the originals (flip=None: loop/flip_check.py).
With a selection fold (holdout > 0), early stopping watches its loss; the best epoch's weights are kept,
and epoch 0 (the untouched backbone) competes too, so a run that only hurts says so instead of producing
a worse model; without one (holdout=0) a fixed schedule of `epochs` runs. Optional LP-FT (probe_epochs)
and WiSE-FT (wise_alpha) recipes: loop/train_recipe.py. The items passed in are only the labels the
backbone may train and select on: the activation decision's labels are kept out by the caller
(loop/decide.py). On CUDA: bf16/fp16 autocast and channels_last.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from embedstore.errors import InvalidArgumentError
from embedstore.ingest.backbones.base import Backbone
from embedstore.loop.flip_check import check_flip
from embedstore.loop.train_data import (
    CachedBatches,
    DeviceRun,
    Labels,
    StreamedBatches,
    class_centroids,
    image_loader,
    image_transforms,
    split_holdout,
    split_labels,
)
from embedstore.loop.train_recipe import choose_alpha, probe, snapshot
from embedstore.loop.train_surgery import (
    CosineHead,
    block_list,
    export_state_dict,
    lora_targets,
    split_frozen_prefix,
    tail_names,
)
from embedstore.progress import progress_bar

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "FinetuneConfig",
    "TrainResult",
    "block_list",
    "export_state_dict",
    "split_frozen_prefix",
    "split_holdout",
    "tail_names",
    "train_backbone",
]

METHODS = ("lora", "last-blocks", "full")
DEFAULT_LR = {"lora": 1e-3, "last-blocks": 3e-4, "full": 5e-5}


AUGMENT = ("light", "strong")


@dataclass
class FinetuneConfig:
    method: str = "last-blocks"
    epochs: int = 16  # with a selection fold: an upper bound (early stopping); without: the fixed schedule
    lr: float | None = None  # default per method: DEFAULT_LR
    head_lr: float = 1e-2  # the temporary cosine classifier
    batch_size: int = 32
    blocks: int = 2  # how many of the last top-level blocks/stages are adapted (lora, last-blocks)
    lora_rank: int = 8
    reg: float = 1e-2  # L2-SP strength (last-blocks, full) / L2 on the LoRA adapters
    holdout: float = 0.0  # selection fold: fraction of the training labels held out for early stopping and
    #                       WiSE alpha (0: no selection fold, a fixed schedule of `epochs`, the last epoch kept)
    patience: int = 3
    probe_epochs: int = 0  # LP-FT: epochs training only the classifier on frozen features before fine-tuning
    wise_alpha: float | None = 1.0  # WiSE-FT: weights = pretrained + alpha * (fine-tuned - pretrained);
    #                                 None: alpha chosen on the selection fold from WISE_GRID
    augment: str = "light"  # light: RandomResizedCrop + flip; strong: + TrivialAugmentWide
    image_size: int | None = None  # training resolution; default: the backbone's input size
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool | None = None  # horizontal flips in training; None: decided from the labels (loop/flip_check.py)
    logit_scale: float = 16.0
    label_smoothing: float = 0.1
    cached_views: int = 4  # augmented views per image pushed once through the frozen prefix (0: no cache)
    cache_limit_mb: int = 2048
    seed: int = 0
    # the activation decision (loop/decide.py), on labels the new backbone never saw:
    decide: float = 0.25  # fraction of each class's labels kept out of training and selection for the decision
    min_decide: int = 20  # fewer decision labels than this: too few to decide, nothing trained
    decide_margin: float = 0.0  # activate when the lower end of the 80% interval of new - old exceeds this
    max_forgetting: float = 0.10  # refuse activation when near-duplicate recall@k on other images drops more
    # self-training (loop/pseudo.py): unlabeled images the frozen heads label confidently join the training fold
    pseudo_threshold: float = 0.9  # calibrated confidence needed for a pseudo-label (0: off)
    pseudo_per_label: float = 2.0  # at most this many pseudo-labels per training label of the class
    pseudo_rounds: int = 1  # further rounds re-label with the trained backbone and train again from the original

    def check(self) -> "FinetuneConfig":
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown fine-tune method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise InvalidArgumentError(f"--epochs {self.epochs}: need at least 1")
        if not 0.0 <= self.holdout < 0.9:
            raise InvalidArgumentError(f"holdout fraction {self.holdout} must be between 0 and 0.9, e.g. 0.2")
        if not 0.0 < self.decide < 0.9:
            raise InvalidArgumentError(f"decide fraction {self.decide} must be between 0 and 0.9, e.g. 0.25")
        if self.augment not in AUGMENT:
            raise InvalidArgumentError(f"augment={self.augment!r}: use one of {', '.join(AUGMENT)}")
        if self.wise_alpha is not None and not 0.0 < self.wise_alpha <= 1.0:
            raise InvalidArgumentError(f"wise_alpha={self.wise_alpha}: must be in (0, 1], or None to choose it")
        if not 0.0 <= self.pseudo_threshold < 1.0:
            raise InvalidArgumentError(f"pseudo_threshold={self.pseudo_threshold}: a confidence in [0, 1) (0: off), e.g. 0.9")
        if self.pseudo_rounds < 1:
            raise InvalidArgumentError(f"pseudo_rounds={self.pseudo_rounds}: at least 1")
        if self.pseudo_per_label < 0:
            raise InvalidArgumentError(f"pseudo_per_label={self.pseudo_per_label}: must be >= 0, e.g. 2")
        if self.blocks < 1:
            raise InvalidArgumentError(f"blocks={self.blocks}: adapt at least the last block")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class TrainResult:
    model: nn.Module  # the adapted image model (LoRA merged), on CPU, eval mode
    best_epoch: int  # 0: nothing beat the untouched backbone
    history: list[dict] = field(default_factory=list)
    probe_losses: list[float] = field(default_factory=list)  # LP-FT's classifier-only epochs
    wise_alpha: float = 1.0  # WiSE-FT interpolation kept
    wise_losses: dict = field(default_factory=dict)  # {alpha: selection-fold loss} when alpha was chosen
    train_ids: list[int] = field(default_factory=list)  # human labels trained on
    pseudo_ids: list[int] = field(default_factory=list)  # pseudo-labeled images trained on
    flip: dict = field(default_factory=dict)  # whether flips were used, and why
    holdout_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    trainable_params: int = 0
    device: str = "cpu"
    config: dict = field(default_factory=dict)


# ---- preparing --------------------------------------------------------------------------------
@dataclass
class _Trainee:
    """The copy being adapted and its temporary classifier."""

    model: nn.Module  # the copy of bb.image_model (LoRA layers injected into it for lora)
    net: nn.Module  # what runs forward: the peft wrapper for lora, else `model`
    trainable: list[nn.Parameter]
    anchors: dict[str, torch.Tensor]  # L2-SP anchors: pretrained values of the trainable weights (not lora)
    head: CosineHead
    named_trainable: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    trainable_names: list[str] = field(default_factory=list)


def _unfreeze(bb: Backbone, cfg: FinetuneConfig):
    """A frozen copy of bb.image_model with the method's weights made trainable:
    (model, net, trainable, anchors, trainable names)."""
    model = copy.deepcopy(bb.image_model).to("cpu").float()
    pnames, mnames = tail_names(model, cfg.blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    anchors: dict[str, torch.Tensor] = {}
    if cfg.method == "lora":
        import peft

        targets = lora_targets(model, mnames)
        if not targets:
            raise InvalidArgumentError(
                f"no Linear/Conv2d layers to attach LoRA to in {bb.name}'s last blocks; use --method last-blocks"
            )
        lcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets, lora_dropout=0.0)
        net = peft.get_peft_model(model, lcfg)
        names = [n for n, _ in net.named_parameters() if "lora_" in n]
        trainable = [p for n, p in net.named_parameters() if "lora_" in n]
        for p in trainable:
            p.requires_grad_(True)
    else:
        net = model
        chosen = set(pnames) if cfg.method == "last-blocks" else {n for n, _ in model.named_parameters()}
        trainable, names = [], []
        for n, p in model.named_parameters():
            if n in chosen:
                p.requires_grad_(True)
                trainable.append(p)
                names.append(n)
                anchors[n] = p.detach().clone()
    return model, net, trainable, anchors, names


def _build_trainee(bb: Backbone, cfg: FinetuneConfig, cent: np.ndarray, dev: DeviceRun) -> _Trainee:
    """The trainable model and the centroid-initialised cosine head, on the device, in eval mode."""
    model, net, trainable, anchors, names = _unfreeze(bb, cfg)
    head = CosineHead(torch.from_numpy(cent), cfg.logit_scale)
    net.to(dev.device).to(memory_format=torch.channels_last)
    head.to(dev.device)
    net.eval()  # frozen BatchNorm statistics, no dropout: few labels make poor batch statistics
    for a in anchors:
        anchors[a] = anchors[a].to(dev.device)
    named_trainable = [(n, p) for n, p in (net.named_parameters() if cfg.method != "lora" else []) if n in anchors]
    return _Trainee(model, net, trainable, anchors, head, named_trainable, names)


@dataclass
class _Optim:
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ce: nn.CrossEntropyLoss


def _make_optimizer(tr: _Trainee, cfg: FinetuneConfig, steps: int, amp_dtype) -> _Optim:
    """AdamW (weight decay on the LoRA adapters) with a one-cycle schedule over `steps`, and the loss."""
    opt = torch.optim.AdamW(
        [
            {"params": tr.trainable, "lr": cfg.learning_rate, "weight_decay": cfg.reg if cfg.method == "lora" else 0.0},
            {"params": tr.head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.learning_rate, cfg.head_lr], total_steps=max(1, steps), pct_start=0.1
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return _Optim(opt, sched, scaler, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def _batch_source(
    bb: Backbone, cfg: FinetuneConfig, labels: Labels, tr: _Trainee, dev: DeviceRun, train_tf, train_loader, hold_loader
):
    """Cached frozen-prefix outputs (later epochs run only the tail) when the model splits and the cache
    fits in cfg.cache_limit_mb; otherwise whole images every epoch."""
    split = split_frozen_prefix(tr.model, cfg.blocks) if cfg.method != "full" and cfg.cached_views > 0 else None
    views = min(cfg.epochs, cfg.cached_views)
    if split is not None:
        with torch.no_grad():
            c, h, w = bb.preprocess.input_size
            size = cfg.image_size or h
            probe = split[0](torch.zeros(1, c, size, size, device=dev.device).contiguous(memory_format=torch.channels_last))
        if probe.numel() * 2 * (views * len(labels.train_ids) + len(labels.hold_ids)) > cfg.cache_limit_mb * 2**20:
            split = None
    if split is None:
        return StreamedBatches(tr.net, train_loader, hold_loader, dev)
    prefix, tail = split
    y_train = labels.targets(labels.train_ids)
    plain = image_loader(labels.items(labels.train_ids), train_tf, bb.preprocess, cfg.batch_size, False, dev.device, cfg.seed)
    y_hold = labels.targets(labels.hold_ids)
    return CachedBatches(prefix, tail, plain, hold_loader, y_train, y_hold, views, cfg.batch_size, dev)


# ---- training ----------------------------------------------------------------------------------
@dataclass
class _TrainState:
    """Everything one run trains with, plus its history, throughput and best epoch so far."""

    cfg: FinetuneConfig
    dev: DeviceRun
    tr: _Trainee
    optim: _Optim
    batches: CachedBatches | StreamedBatches
    history: list[dict] = field(default_factory=list)
    seen: int = 0  # training images processed
    t_train: float = 0.0  # seconds spent on them
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_weights: list[torch.Tensor] = field(default_factory=list)
    best_head: torch.Tensor | None = None
    probe_losses: list = field(default_factory=list)
    alpha: float = 1.0
    alpha_losses: dict = field(default_factory=dict)
    head_init: torch.Tensor | None = None  # the classifier's centroid start (WiSE alpha = 0)
    batches_have_hold: bool = True  # a selection fold exists (early stopping, WiSE alpha)


@torch.no_grad()
def _held_out(st: _TrainState) -> tuple[float, float]:
    """(mean loss, accuracy) on the selection fold; (nan, nan) without one."""
    losses, correct, n = 0.0, 0, 0
    for x, y in st.batches.hold():
        y = y.to(st.dev.device)
        logits = st.tr.head(st.dev.forward(st.batches.fwd, x))
        losses += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return (losses / n, correct / n) if n else (float("nan"), float("nan"))


def _train_epoch(st: _TrainState, epoch: int, advance) -> float:
    """One pass over the training fold; returns the mean training loss (L2-SP term included)."""
    cfg, tr, o = st.cfg, st.tr, st.optim
    total, count = 0.0, 0
    te = time.perf_counter()
    for x, y in st.batches.train(epoch):
        y = y.to(st.dev.device)
        logits = tr.head(st.dev.forward(st.batches.fwd, x))
        loss = o.ce(logits, y)
        if tr.anchors:
            loss = loss + cfg.reg * sum(((p - tr.anchors[n]) ** 2).sum() for n, p in tr.named_trainable)
        o.opt.zero_grad(set_to_none=True)
        o.scaler.scale(loss).backward()
        o.scaler.step(o.opt)
        o.scaler.update()
        o.sched.step()
        total += loss.item() * len(y)
        count += len(y)
        st.seen += len(y)
        st.t_train += time.perf_counter() - te
        te = time.perf_counter()
        advance(len(y), loss=total / count, epoch=epoch)
    return total / count


def _record(st: _TrainState, epoch: int, train_loss: float | None) -> bool:
    """Evaluate the selection fold, log the epoch, keep a snapshot if it is the best so far (without a
    selection fold: the latest epoch, a fixed schedule); False: stop early."""
    hl, ha = _held_out(st) if st.batches_have_hold else (None, None)
    st.history.append(
        {
            "epoch": epoch,
            "train_loss": None if train_loss is None else round(train_loss, 4),
            "holdout_loss": None if hl is None else round(hl, 4),
            "holdout_accuracy": None if ha is None else round(ha, 4),
        }
    )
    if epoch == 0 or hl is None or hl < st.best_loss - 1e-4:
        st.best_loss, st.best_epoch = (st.best_loss if hl is None else hl), epoch
        snapshot(st)
    elif epoch - st.best_epoch >= st.cfg.patience:
        return False
    return True


def _fit(st: _TrainState, advance) -> None:
    """LP (cfg.probe_epochs, classifier only), epoch 0 (the untouched backbone), then train until cfg.epochs
    or `patience` epochs without progress on the selection fold."""
    st.probe_losses = probe(st, st.cfg.probe_epochs)
    _record(st, 0, None)
    for epoch in range(1, st.cfg.epochs + 1):
        train_loss = _train_epoch(st, epoch, advance)
        if not _record(st, epoch, train_loss):
            break


def _final_model(st: _TrainState) -> nn.Module:
    """The best epoch's weights (WiSE-interpolated), LoRA merged, on CPU, frozen, in eval mode."""
    tr = st.tr
    st.alpha, st.alpha_losses = choose_alpha(st, _held_out)
    model = tr.net.merge_and_unload() if st.cfg.method == "lora" else tr.model
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_backbone(
    bb: Backbone,
    items: Sequence[tuple[int, str, str]],
    init_vectors: dict[int, np.ndarray],
    cfg: FinetuneConfig,
    device: str = "cpu",
    progress: bool = True,
    pseudo: Sequence[tuple[int, str, str]] = (),
) -> TrainResult:
    """Fine-tune a copy of `bb.image_model` on (id, path, class) items; `bb` itself is left untouched.

    init_vectors: {id: frozen vector} (the store's own) for the classifier's starting centroids.
    pseudo: (id, path, class) of unlabeled images with pseudo-labels (loop/pseudo.py): training fold only.
    """
    cfg.check()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    labels = split_labels(items, cfg, pseudo)
    human = {int(i) for i, _, _ in items}
    pseudo_set = {i for i in labels.train_ids if i not in human}
    cent = class_centroids(labels, init_vectors, bb.dim)
    dev = DeviceRun(device)
    tr = _build_trainee(bb, cfg, cent, dev)
    size = cfg.image_size or bb.preprocess.input_size[-1]
    flip = {"flip": cfg.flip, "reason": "set by the caller"} if cfg.flip is not None else check_flip(bb, items, init_vectors, cfg.seed)
    train_tf, eval_tf = image_transforms(bb.preprocess, size, cfg.crop_scale, flip["flip"], cfg.augment == "strong")
    bs = cfg.batch_size
    train_loader = image_loader(labels.items(labels.train_ids), train_tf, bb.preprocess, bs, True, device, cfg.seed)
    hold_loader = image_loader(labels.items(labels.hold_ids), eval_tf, bb.preprocess, bs, False, device, cfg.seed)
    optim = _make_optimizer(tr, cfg, cfg.epochs * len(train_loader), dev.amp_dtype)
    batches = _batch_source(bb, cfg, labels, tr, dev, train_tf, train_loader, hold_loader)
    st = _TrainState(cfg, dev, tr, optim, batches, head_init=tr.head.weight.detach().clone(),
                     batches_have_hold=bool(labels.hold_ids))
    total, label = cfg.epochs * len(labels.train_ids), f"fine-tune ({cfg.method})"
    fields = {"loss": "loss {:.3f}", "epoch": "epoch {}"}
    with progress_bar(total, label, progress, unit="img", fields=fields) as advance:
        _fit(st, advance)
    model = _final_model(st)
    return TrainResult(
        model=model,
        best_epoch=st.best_epoch,
        history=st.history,
        probe_losses=st.probe_losses,
        wise_alpha=st.alpha,
        wise_losses={str(k): v for k, v in st.alpha_losses.items()},
        train_ids=[i for i in labels.train_ids if i not in pseudo_set],
        pseudo_ids=[i for i in labels.train_ids if i in pseudo_set],
        flip=flip,
        holdout_ids=labels.hold_ids,
        seconds=time.perf_counter() - t0,
        images_per_second=st.seen / st.t_train if st.t_train else 0.0,
        trainable_params=int(sum(p.numel() for p in tr.trainable)),
        device=device,
        config={**asdict(cfg), "lr": cfg.learning_rate},
    )
