"""Adapt a backbone to the store's labels without forgetting what it knew.

Methods (all start from the active backbone's weights):
    lora         peft LoRA adapters on the Linear / Conv2d (non-depthwise) layers of the last blocks, L2
                 on the adapters (a pull toward the pretrained weights); merged into the weights at the end
    last-blocks  the last blocks unfrozen, L2-SP toward the pretrained weights (Li et al., 2018)
    full         every weight unfrozen, L2-SP, smaller learning rate

During training a cosine classifier sits on top of the pooled features, initialised from the class
centroids of the frozen vectors (so step 0 is already the centroid head); it is discarded afterwards:
the store keeps only the backbone. BatchNorm statistics stay frozen (eval mode): few images make poor
batch statistics. Augmentation: RandomResizedCrop + horizontal flip. Early stopping watches the
held-out fold's loss; the best epoch's weights are kept, and epoch 0 (the untouched backbone) competes
too, so a run that only hurts says so instead of producing a worse model. On CUDA: bf16/fp16 autocast
and channels_last.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from embedstore.ingest.backbones.base import Backbone
from embedstore.errors import EmptyInputError, InvalidArgumentError

METHODS = ("lora", "last-blocks", "full")
DEFAULT_LR = {"lora": 1e-3, "last-blocks": 3e-4, "full": 5e-5}


@dataclass
class FinetuneConfig:
    method: str = "lora"
    epochs: int = 10  # an upper bound: early stopping usually ends sooner
    lr: float | None = None  # default per method: DEFAULT_LR
    head_lr: float = 1e-2  # the temporary cosine classifier
    batch_size: int = 32
    blocks: int = 2  # how many of the last top-level blocks/stages are adapted (lora, last-blocks)
    lora_rank: int = 8
    reg: float = 1e-2  # L2-SP strength (last-blocks, full) / L2 on the LoRA adapters
    holdout: float = 0.2  # fraction of each class's labels held out for early stopping and the decision
    patience: int = 3
    image_size: int | None = None  # training resolution; default: the backbone's input size
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    logit_scale: float = 16.0
    label_smoothing: float = 0.1
    cached_views: int = 4  # augmented views per image pushed once through the frozen prefix (0: no cache)
    cache_limit_mb: int = 2048
    seed: int = 0

    def check(self) -> "FinetuneConfig":
        if self.method not in METHODS:
            raise InvalidArgumentError(f"unknown fine-tune method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise InvalidArgumentError(f"--epochs {self.epochs}: need at least 1")
        if not 0.0 < self.holdout < 0.9:
            raise InvalidArgumentError(f"holdout fraction {self.holdout} must be between 0 and 0.9, e.g. 0.2")
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
    train_ids: list[int] = field(default_factory=list)
    holdout_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    trainable_params: int = 0
    device: str = "cpu"
    config: dict = field(default_factory=dict)


# ---- data ----------------------------------------------------------------------------------
def split_holdout(ids: Sequence[int], y: Sequence[str], frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified split: round(frac * n) of each class held out, at least 1 when the class has 2+ images."""
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


class _LabeledImages(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable, pre):
        self.items, self.tf, self.pre = list(items), transform, pre

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from embedstore.ingest.pipeline import load_image

        path, y = self.items[i]
        return self.tf(load_image(path, self.pre)), y


def _transforms(bb: Backbone, cfg: FinetuneConfig):
    from torchvision import transforms as T

    pre = bb.preprocess
    size = cfg.image_size or pre.input_size[-1]
    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    train = [T.RandomResizedCrop(size, scale=cfg.crop_scale, interpolation=interp)]
    if cfg.flip:
        train.append(T.RandomHorizontalFlip())
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    evaluate = [T.Resize(int(math.floor(size / pre.crop_pct)), interpolation=interp), T.CenterCrop(size)]
    return T.Compose(train + norm), T.Compose(evaluate + norm)


def _loader(items, tf, pre, batch_size: int, shuffle: bool, device: str, seed: int):
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


# ---- which weights adapt -------------------------------------------------------------------
def block_list(model: nn.Module) -> list[nn.Module]:
    """The model's sequence of top-level blocks (timm: blocks/stages/layers; open_clip: transformer.resblocks)."""
    for path in ("blocks", "stages", "layers", "transformer.resblocks", "trunk.blocks", "trunk.stages"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
            return list(mod)
    return []


def tail_names(model: nn.Module, n_blocks: int) -> tuple[list[str], list[str]]:
    """(parameter names, module names) from the first of the last `n_blocks` blocks to the end of the model.

    "The end" follows registration order, so the final norm / projection conv of timm models is included.
    Models without a recognisable block list adapt their last 25% of parameters.
    """
    blocks = block_list(model)
    pnames = [n for n, _ in model.named_parameters()]
    mnames = [n for n, _ in model.named_modules()]
    if blocks:
        first = blocks[max(0, len(blocks) - n_blocks)]
        start_mod = next(n for n, m in model.named_modules() if m is first)
        start_p = next((i for i, n in enumerate(pnames) if n.startswith(start_mod + ".")), 0)
        start_m = mnames.index(start_mod)
    else:
        start_p = int(len(pnames) * 0.75)
        first_p = pnames[start_p] if pnames else ""
        start_m = next((i for i, n in enumerate(mnames) if n and first_p.startswith(n + ".")), 0)
    return pnames[start_p:], mnames[start_m:]


def _lora_targets(model: nn.Module, module_names: Sequence[str]) -> list[str]:
    mods = dict(model.named_modules())
    out = []
    for n in module_names:
        m = mods[n]
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(n)
    return out


class _Tail(nn.Module):
    """The rest of a timm EfficientNet/MobileNet-style model after its first `start` blocks."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        for b in m.blocks[self.start :]:
            h = b(h)
        return m.forward_head(m.bn2(m.conv_head(h)))


def split_frozen_prefix(model: nn.Module, n_blocks: int):
    """(prefix, tail) for models whose forward is conv_stem -> bn1 -> blocks -> conv_head -> bn2 -> head
    (timm EfficientNet, MobileNet): the frozen prefix's output can be cached; None for other models."""
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if not all(hasattr(model, a) for a in needed) or not isinstance(model.blocks, nn.Sequential):
        return None
    start = max(0, len(model.blocks) - n_blocks)

    def prefix(x: torch.Tensor) -> torch.Tensor:
        h = model.bn1(model.conv_stem(x))
        for b in model.blocks[:start]:
            h = b(h)
        return h

    return prefix, _Tail(model, start)


class _CosineHead(nn.Module):
    def __init__(self, centroids: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(centroids.clone())
        self.scale = scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(f.float(), dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T


# ---- training ------------------------------------------------------------------------------
def train_backbone(
    bb: Backbone,
    items: Sequence[tuple[int, str, str]],
    init_vectors: dict[int, np.ndarray],
    cfg: FinetuneConfig,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a copy of `bb.image_model` on (id, path, class) items; `bb` itself is left untouched.

    init_vectors: {id: frozen vector} (the store's own) for the classifier's starting centroids.
    """
    cfg.check()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    ids = [int(i) for i, _, _ in items]
    y_names = [c for _, _, c in items]
    classes = sorted(set(y_names))
    if len(classes) < 2:
        raise EmptyInputError("fine-tuning needs labels of at least 2 classes; label more images first")
    train_ids, hold_ids = split_holdout(ids, y_names, cfg.holdout, cfg.seed)
    if not hold_ids or len(train_ids) < len(classes):
        raise EmptyInputError(
            f"too few labels to fine-tune ({len(ids)} over {len(classes)} classes); label at least 3 images per class"
        )
    cidx = {c: k for k, c in enumerate(classes)}
    by_id = {int(i): (p, cidx[c]) for i, p, c in items}

    # the classifier starts at the class centroids of the frozen vectors
    D = bb.dim
    cent = np.zeros((len(classes), D), np.float32)
    for i in train_ids:
        cent[by_id[i][1]] += init_vectors[i]
    cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12

    model = copy.deepcopy(bb.image_model).to("cpu").float()
    pnames, mnames = tail_names(model, cfg.blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    anchors: dict[str, torch.Tensor] = {}
    if cfg.method == "lora":
        import peft

        targets = _lora_targets(model, mnames)
        if not targets:
            raise InvalidArgumentError(
                f"no Linear/Conv2d layers to attach LoRA to in {bb.name}'s last blocks; use --method last-blocks"
            )
        lcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets, lora_dropout=0.0)
        net = peft.get_peft_model(model, lcfg)
        trainable = [p for n, p in net.named_parameters() if "lora_" in n]
        for p in trainable:
            p.requires_grad_(True)
    else:
        net = model
        chosen = set(pnames) if cfg.method == "last-blocks" else {n for n, _ in model.named_parameters()}
        trainable = []
        for n, p in model.named_parameters():
            if n in chosen:
                p.requires_grad_(True)
                trainable.append(p)
                anchors[n] = p.detach().clone()
    head = _CosineHead(torch.from_numpy(cent), cfg.logit_scale)

    cuda = device.startswith("cuda")
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    net.to(device).to(memory_format=torch.channels_last)
    head.to(device)
    net.eval()  # frozen BatchNorm statistics, no dropout: few labels make poor batch statistics
    for a in anchors:
        anchors[a] = anchors[a].to(device)
    named_trainable = [(n, p) for n, p in (net.named_parameters() if cfg.method != "lora" else []) if n in anchors]
    opt = torch.optim.AdamW(
        [
            {"params": trainable, "lr": cfg.learning_rate, "weight_decay": cfg.reg if cfg.method == "lora" else 0.0},
            {"params": head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
    )
    train_tf, eval_tf = _transforms(bb, cfg)
    bs = cfg.batch_size
    train_items = [by_id[i] for i in train_ids]
    train_loader = _loader(train_items, train_tf, bb.preprocess, bs, True, device, cfg.seed)
    hold_loader = _loader([by_id[i] for i in hold_ids], eval_tf, bb.preprocess, bs, False, device, cfg.seed)
    steps = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.learning_rate, cfg.head_lr], total_steps=max(1, steps), pct_start=0.1
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def to_dev(x):
        return x.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)

    def run(fn, x):
        with torch.autocast("cuda", dtype=amp_dtype, enabled=cuda):
            return fn(x)

    # the frozen prefix's output is cached for a few augmented views: later epochs run only the tail
    split = split_frozen_prefix(model, cfg.blocks) if cfg.method != "full" and cfg.cached_views > 0 else None
    views = min(cfg.epochs, cfg.cached_views)
    if split is not None:
        with torch.no_grad():
            c, h, w = bb.preprocess.input_size
            size = cfg.image_size or h
            probe = split[0](torch.zeros(1, c, size, size, device=device).contiguous(memory_format=torch.channels_last))
        if probe.numel() * 2 * (views * len(train_ids) + len(hold_ids)) > cfg.cache_limit_mb * 2**20:
            split = None
    if split is not None:
        prefix, tail = split
        fwd = tail
        ytr = torch.tensor([by_id[i][1] for i in train_ids])

        @torch.no_grad()
        def encode(loader):
            return torch.cat([run(prefix, to_dev(x)).to(torch.float16 if cuda else torch.float32) for x, _ in loader])

        plain = _loader(train_items, train_tf, bb.preprocess, bs, False, device, cfg.seed)
        cache = [encode(plain) for _ in range(views)]
        hold_cache = encode(hold_loader)

        def train_batches(epoch):
            feats = cache[(epoch - 1) % views]
            perm = torch.randperm(len(ytr))
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                yield feats[idx.to(feats.device)].float(), ytr[idx]

        def hold_batches():
            for i in range(0, len(hold_ids), bs):
                yield hold_cache[i : i + bs].float(), torch.tensor([by_id[j][1] for j in hold_ids[i : i + bs]])
    else:
        fwd = net

        def train_batches(epoch):
            return ((to_dev(x), y) for x, y in train_loader)

        def hold_batches():
            return ((to_dev(x), y) for x, y in hold_loader)

    @torch.no_grad()
    def held_out() -> tuple[float, float]:
        losses, correct, n = 0.0, 0, 0
        for x, y in hold_batches():
            y = y.to(device)
            logits = head(run(fwd, x))
            losses += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        return losses / n, correct / n

    def snapshot():
        return [p.detach().clone() for p in trainable], [p.detach().clone() for p in head.parameters()]

    loss0, acc0 = held_out()
    history = [{"epoch": 0, "train_loss": None, "holdout_loss": round(loss0, 4), "holdout_accuracy": round(acc0, 4)}]
    best = (loss0, 0, snapshot())
    seen, t_train = 0, 0.0
    with _progress(cfg.epochs * len(train_ids), cfg.method, progress) as update:
        for epoch in range(1, cfg.epochs + 1):
            total, count = 0.0, 0
            te = time.perf_counter()
            for x, y in train_batches(epoch):
                y = y.to(device)
                logits = head(run(fwd, x))
                loss = ce(logits, y)
                if anchors:
                    loss = loss + cfg.reg * sum(((p - anchors[n]) ** 2).sum() for n, p in named_trainable)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                total += loss.item() * len(y)
                count += len(y)
                seen += len(y)
                t_train += time.perf_counter() - te
                te = time.perf_counter()
                update(len(y), total / count, seen / t_train if t_train else 0.0, epoch)
            hl, ha = held_out()
            history.append(
                {"epoch": epoch, "train_loss": round(total / count, 4), "holdout_loss": round(hl, 4), "holdout_accuracy": round(ha, 4)}
            )
            if hl < best[0] - 1e-4:
                best = (hl, epoch, snapshot())
            elif epoch - best[1] >= cfg.patience:
                break

    best_epoch = best[1]
    with torch.no_grad():
        for p, v in zip(trainable, best[2][0]):
            p.copy_(v)
    if cfg.method == "lora":
        model = net.merge_and_unload()
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainResult(
        model=model,
        best_epoch=best_epoch,
        history=history,
        train_ids=train_ids,
        holdout_ids=hold_ids,
        seconds=time.perf_counter() - t0,
        images_per_second=seen / t_train if t_train else 0.0,
        trainable_params=int(sum(p.numel() for p in trainable)),
        device=device,
        config={**asdict(cfg), "lr": cfg.learning_rate},
    )


# ---- saving --------------------------------------------------------------------------------
def export_state_dict(bb: Backbone, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that `load_backbone(bb.name, weights=FILE)` loads into the same architecture."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    prefix = bb.name.split(":", 1)[0]
    if prefix == "openclip":  # the checkpoint holds the whole CLIP model; only the image tower changed
        full = {k: v.detach().cpu() for k, v in bb.extra["clip_model"].state_dict().items()}
        full.update({"visual." + k: v for k, v in sd.items()})
        return full
    if prefix == "offline":  # timm keys, classifier included (the offline loader expects a full model)
        import timm

        from embedstore.ingest.backbones.checkpoint import read_state_dict
        from embedstore.ingest.backbones.offline import packaged_weights_path, positional_state_dict

        ref = timm.create_model("efficientnet_lite0", pretrained=False)
        packaged = positional_state_dict(ref, read_state_dict(packaged_weights_path()))
        for k, v in packaged.items():
            sd.setdefault(k, v)
    return sd


# ---- progress ------------------------------------------------------------------------------
class _progress:
    """A rich progress bar with loss and images/s; a no-op when disabled."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return lambda *a: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(
            TextColumn("[bold]fine-tune ({task.fields[method]}) epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("[cyan]{task.fields[rate]:.1f} img/s"),
            TimeElapsedColumn(),
        )
        self._p.__enter__()
        task = self._p.add_task("fine-tune", total=self.total, method=self.label, epoch=1, loss=0.0, rate=0.0)

        def update(n, loss, rate, epoch):
            self._p.update(task, advance=n, loss=loss, rate=rate, epoch=epoch)

        return update

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False
