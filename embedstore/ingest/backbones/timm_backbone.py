"""timm:MODEL[.TAG] — any timm model as a pooled feature extractor (num_classes=0)."""

from __future__ import annotations

from embedstore.errors import UnknownBackboneError
from embedstore.ingest.backbones.base import Backbone, PreprocessCfg, file_digest
from embedstore.ingest.backbones.checkpoint import download_errors, load_into, read_state_dict


def preprocess_from_timm(model) -> PreprocessCfg:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return PreprocessCfg.from_dict(cfg)


def feature_dim(model) -> int:
    return int(getattr(model, "num_features", 0) or getattr(model, "embed_dim"))


def create_timm(model_name: str, tag: str | None, pretrained: bool):
    import timm

    if not timm.is_model(model_name):
        raise UnknownBackboneError(
            f"timm has no model '{model_name}'; list them with python -c \"import timm; print(timm.list_models('*{model_name[:6]}*'))\""
        )
    full = f"{model_name}.{tag}" if tag else model_name
    return timm.create_model(full, pretrained=pretrained, num_classes=0)


def load(name, weights: str | None) -> Backbone:
    spec = str(name)
    if weights:
        model = create_timm(name.model, name.tag, pretrained=False)
        load_into(model, read_state_dict(weights), weights, ignore_prefixes=("classifier", "head", "fc"))
        weights_id = "sha256:" + file_digest(weights)
    else:
        with download_errors(spec):
            model = create_timm(name.model, name.tag, pretrained=True)
        weights_id = f"hub:{spec}"
    return Backbone(
        name=spec,
        weights_id=weights_id,
        image_model=model,
        preprocess=preprocess_from_timm(model),
        dim=feature_dim(model),
        weights_path=weights,
    )
