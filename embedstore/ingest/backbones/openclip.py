"""openclip:ARCH/PRETRAINED — open_clip image tower for vectors, text tower for text search / zero-shot.

PRETRAINED may be a tag from open_clip.list_pretrained(), or `random` (seeded random init: only for
tests and shape checks). With weights=FILE the checkpoint is loaded into ARCH.
"""

from __future__ import annotations

from embedstore.errors import BackboneLoadError, UnknownBackboneError
from embedstore.ingest.backbones.base import Backbone, PreprocessCfg, file_digest
from embedstore.ingest.backbones.checkpoint import download_errors, load_into, read_state_dict


def _preprocess_cfg(model) -> PreprocessCfg:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    return PreprocessCfg(
        input_size=(3, int(size), int(size)),
        mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=1.0,  # open_clip: resize shorter side to `size`, centre crop `size`
    )




def load(name, weights: str | None) -> Backbone:
    import open_clip
    import torch

    spec = str(name)
    if name.model not in open_clip.list_models():
        raise UnknownBackboneError(
            f"open_clip has no architecture '{name.model}'; see python -c \"import open_clip; print(open_clip.list_models())\""
        )
    if weights:
        model = open_clip.create_model(name.model, pretrained=None)
        load_into(model, read_state_dict(weights), weights)
        weights_id = "sha256:" + file_digest(weights)
    elif name.tag in (None, "random"):
        if name.tag is None:
            tags = [t for a, t in open_clip.list_pretrained() if a == name.model][:4]
            raise UnknownBackboneError(
                f"openclip:{name.model} needs weights: openclip:{name.model}/TAG (tags: {', '.join(tags) or 'none'}), "
                "--weights FILE, or /random for a random-init test model"
            )
        torch.manual_seed(0)
        model = open_clip.create_model(name.model, pretrained=None)
        weights_id = "random:seed0"
    else:
        known = {t for a, t in open_clip.list_pretrained() if a == name.model}
        if name.tag not in known:
            raise UnknownBackboneError(
                f"open_clip has no weights '{name.tag}' for {name.model}; known: {', '.join(sorted(known)) or 'none'}"
            )
        with download_errors(spec):
            model = open_clip.create_model(name.model, pretrained=name.tag)
        weights_id = f"hub:{spec}"
    model.eval()
    tokenizer = open_clip.get_tokenizer(name.model)
    visual = model.visual
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])

    def encode_text(texts):
        dev = next(model.parameters()).device
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts).to(dev), normalize=True)

    if not callable(getattr(visual, "forward", None)):
        raise BackboneLoadError(f"{spec}: model has no image tower")
    bb = Backbone(
        name=spec,
        weights_id=weights_id,
        image_model=visual,
        preprocess=_preprocess_cfg(model),
        dim=dim,
        text_encoder=encode_text,
        weights_path=weights,
        extra={"text_model": model, "clip_model": model},
    )
    return bb
