"""The head interface every few-shot head implements.

All heads work on L2-normalised float32 vectors (N, D). Classes are strings. Probabilities are
(N, C) rows summing to 1 over `classes` (in that order). Heads that need the whole collection
(transductive propagation, CL2N centering) receive it through `fit(..., unlabeled=U)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Head(ABC):
    name: str = "base"

    classes: list[str]

    @abstractmethod
    def fit(self, X: np.ndarray, y: list[str] | np.ndarray, unlabeled: np.ndarray | None = None) -> "Head":
        """Fit on labeled vectors X (N, D) with class names y; `unlabeled` is the rest of the collection."""

    @abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(M, C) probabilities over self.classes."""

    def predict(self, X: np.ndarray) -> list[str]:
        P = self.predict_proba(X)
        return [self.classes[i] for i in P.argmax(1)]

    def add_class(self, X: np.ndarray, name: str) -> "Head":
        """Make a new class predictable from a few examples without refitting on the whole collection."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path) -> "Head":
        raise NotImplementedError
