"""Model surgery for fine-tuning: which weights adapt, the cacheable frozen prefix, the temporary cosine
classifier, and the state dict that `load_backbone(..., weights=FILE)` reads back."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embedstore.ingest.backbones.base import Backbone


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


def lora_targets(model: nn.Module, module_names: Sequence[str]) -> list[str]:
    """The modules among `module_names` that LoRA can wrap: Linear and non-grouped (not depthwise) Conv2d."""
    mods = dict(model.named_modules())
    out = []
    for n in module_names:
        m = mods[n]
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(n)
    return out


# ---- the cacheable frozen prefix -----------------------------------------------------------
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


# ---- the temporary classifier --------------------------------------------------------------
class CosineHead(nn.Module):
    """Scaled cosine similarity of the pooled features to one weight vector per class."""

    def __init__(self, centroids: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(centroids.clone())
        self.scale = scale

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(f.float(), dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T


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
        from embedstore.ingest.backbones.offline import (
            packaged_weights_path,
            positional_state_dict,
        )

        ref = timm.create_model("efficientnet_lite0", pretrained=False)
        packaged = positional_state_dict(ref, read_state_dict(packaged_weights_path()))
        for k, v in packaged.items():
            sd.setdefault(k, v)
    return sd
