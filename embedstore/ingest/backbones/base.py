"""The Backbone protocol and the preprocessing config that travels with every vector."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from embedstore.errors import NotSupportedError
from embedstore.ingest.images import load_image


@dataclass(frozen=True)
class PreprocessCfg:
    """How an image becomes the model's input (as timm's PretrainedCfg / open_clip's preprocess_cfg)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop; also the JPEG draft target."""
        return int(math.floor(self.input_size[-1] / self.crop_pct))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = [float(x) for x in self.mean]
        d["std"] = [float(x) for x in self.std]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessCfg":
        return cls(
            input_size=tuple(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )

    def build_transform(self) -> Callable:
        """One factory for the eval transform: resize shorter side, centre crop, to tensor, normalise."""
        from torchvision import transforms as T

        interp = {
            "bicubic": T.InterpolationMode.BICUBIC,
            "bilinear": T.InterpolationMode.BILINEAR,
            "nearest": T.InterpolationMode.NEAREST,
        }.get(self.interpolation, T.InterpolationMode.BICUBIC)
        size = self.input_size[-1]
        return T.Compose(
            [
                T.Resize(self.resize_size, interpolation=interp),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(name: str, weights_id: str, preprocess: PreprocessCfg) -> str:
    """Version fingerprint: backbone name + weights digest + preprocessing, 12 hex characters."""
    blob = json.dumps({"name": name, "weights": weights_id, "pre": preprocess.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Backbone:
    """A frozen encoder. `image_model` maps a normalised (B,3,H,W) batch to (B,D) features.

    `text_encoder`, when set, maps a list of strings to (B,D) features (CLIP's text tower).
    """

    name: str
    weights_id: str
    image_model: torch.nn.Module
    preprocess: PreprocessCfg
    dim: int
    text_encoder: Callable[[Sequence[str]], torch.Tensor] | None = None
    weights_path: str | None = None
    extra: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def version(self) -> str:
        return fingerprint(self.name, self.weights_id, self.preprocess)

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    def describe(self) -> dict:
        """What a reopened store needs to embed a query the same way."""
        return {
            "name": self.name,
            "weights": self.weights_path,
            "weights_id": self.weights_id,
            "version": self.version,
            "dim": self.dim,
            "preprocess": self.preprocess.to_dict(),
            "text": self.has_text,
        }

    def transform(self) -> Callable:
        return self.preprocess.build_transform()

    def to(self, device: str) -> "Backbone":
        self.image_model.to(device)
        if "text_model" in self.extra:
            self.extra["text_model"].to(device)
        self.device = device
        return self

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) on the model's device -> L2-normalised float32 (B,D)."""
        feats = self.image_model(batch)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def embed_images(self, images, batch_size: int = 32) -> np.ndarray:
        """PIL images (or paths) -> (N,D) float32, L2-normalised. For small ad-hoc sets (queries)."""
        tf = self.transform()
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [load_image(im, self.preprocess) if not hasattr(im, "convert") else im.convert("RGB")
                     for im in images[i : i + batch_size]]
            x = torch.stack([tf(im) for im in chunk]).to(self.device)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(self.forward(x).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.text_encoder is None:
            raise NotSupportedError(
                f"backbone {self.name} has no text tower; text queries and zero-shot need an openclip: backbone"
            )
        feats = self.text_encoder(list(texts))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)
