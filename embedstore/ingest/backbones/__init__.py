"""Backbones: frozen image (and text) encoders behind one small protocol, named through one registry."""

from embedstore.ingest.backbones.base import Backbone, PreprocessCfg
from embedstore.ingest.backbones.registry import DEFAULT_BACKBONE, KNOWN_BACKBONES, BackboneName, load_backbone, parse_name

__all__ = [
    "Backbone",
    "PreprocessCfg",
    "BackboneName",
    "DEFAULT_BACKBONE",
    "KNOWN_BACKBONES",
    "load_backbone",
    "parse_name",
]
