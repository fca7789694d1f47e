"""Zero-shot classification from class names through CLIP's text tower, with a prompt ensemble.

Each class name is put into every template of `templates` (data, below; from CLIP's ImageNet prompt
engineering notebook), encoded by `text_encoder` (a callable list[str] -> (n, D) L2-normalised, e.g. an
open_clip backbone's `embed_texts`), averaged and re-normalised into one text prototype per class.
Scores are CLIP logits: logit_scale * cosine. Labeled examples are not needed; `fit` only takes the
class names from y (or `fit_classes(names)`). A saved head keeps its text prototypes; set
`head.text_encoder` after loading to add classes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from embedstore.errors import NotSupportedError
from embedstore.labels.heads.base import Head, encode_labels, l2n, register

# CLIP's 7-template ensemble for ImageNet ("Prompt_Engineering_for_ImageNet.ipynb") + the plain prompt
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def readable(name: str) -> str:
    """Folder-style class names ("motorcycle_left", "golden-retriever") as words for the prompts."""
    return str(name).replace("_", " ").replace("-", " ").strip()


def text_prototypes(text_encoder: Callable, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(C, D) one normalised prompt-ensemble embedding per class name."""
    if text_encoder is None:
        raise NotSupportedError("zero-shot needs a text tower: use an open_clip backbone (e.g. openclip:ViT-B-32/...)")
    prompts = [t.format(readable(n)) for n in names for t in templates]
    T = np.asarray(_to_numpy(text_encoder(prompts)), np.float32).reshape(len(names), len(templates), -1)
    return l2n(l2n(T).mean(1))


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x


@register
class ZeroShotHead(Head):
    name = "zeroshot"
    params = ("templates", "logit_scale")

    def __init__(self, text_encoder: Callable | None = None, templates: Sequence[str] = TEMPLATES,
                 logit_scale: float = 100.0, center: bool = False):
        super().__init__(center=False)  # centring image vectors would move them away from the text space
        self.text_encoder = text_encoder
        self.templates = list(templates)
        self.logit_scale = float(logit_scale)
        self.W = np.zeros((0, 0), np.float32)

    def clone(self):
        h = super().clone()
        h.text_encoder = self.text_encoder
        return h

    def fit(self, X=None, y=None, unlabeled=None):
        classes, _ = encode_labels(y)
        return self.fit_classes(classes)

    def fit_classes(self, names: Sequence[str]) -> "ZeroShotHead":
        self.classes = [str(n) for n in names]
        self.W = text_prototypes(self.text_encoder, self.classes, self.templates)
        return self

    def _logits(self, X):
        return self.logit_scale * (X @ self.W.T)

    def add_class(self, X, name):
        self._new_class(name)
        self.W = np.vstack([self.W, text_prototypes(self.text_encoder, [str(name)], self.templates)])
        return self

    def _arrays(self):
        return {"W": self.W}

    def _set_arrays(self, a):
        self.W = a["W"]
