"""k-NN with similarity-weighted votes, as in DINOv2's eval/knn.py: each of the k nearest labeled
vectors votes for its class with weight softmax(sim / T) over the k (T = 0.07).

k defaults to min(20, labeled count): with few labels the sharp softmax makes the nearest examples
dominate anyway, and more labels smooth the vote. New classes are instant (append the examples).
"""

from __future__ import annotations

import numpy as np

from embedstore.labels.heads.base import Head, encode_labels, register, softmax

EPS = 1e-6


@register
class KNNHead(Head):
    name = "knn"
    params = ("k", "T", "center")

    def __init__(self, k: int = 20, T: float = 0.07, center: bool = False):
        super().__init__(center)
        self.k, self.T = int(k), float(T)
        self.X = np.zeros((0, 0), np.float32)
        self.y = np.zeros(0, np.int64)

    def fit(self, X, y, unlabeled=None):
        self._fit_mean(self._raw(X), None if unlabeled is None else self._raw(unlabeled))
        self.classes, self.y = encode_labels(y)
        self.X = self._prep(X)
        self._remember(X)
        return self

    @staticmethod
    def _raw(X):
        return np.asarray(X, dtype=np.float32)

    def votes(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: (vote share per class (M, C), neighbour rows (M, k), neighbour sims (M, k))."""
        S = X @ self.X.T
        k = max(1, min(self.k, len(self.X)))
        nn = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]), (len(S), 1))
        sims = np.take_along_axis(S, nn, 1)
        order = np.argsort(-sims, axis=1)
        nn, sims = np.take_along_axis(nn, order, 1), np.take_along_axis(sims, order, 1)
        w = softmax(sims / self.T, axis=1)
        V = np.zeros((len(X), len(self.classes)), np.float64)
        np.add.at(V, (np.repeat(np.arange(len(X)), k), self.y[nn].ravel()), w.ravel())
        return V, nn, sims

    def _logits(self, X):
        V, _, _ = self.votes(X)
        return np.log(V + EPS).astype(np.float32)

    def add_class(self, X, name):
        self._new_class(name)
        Xn = self._prep(X)
        self._remember(X, append=True)
        self.X = np.vstack([self.X, Xn])
        self.y = np.concatenate([self.y, np.full(len(Xn), len(self.classes) - 1)])
        return self

    def _arrays(self):
        return {"X": self.X, "y": self.y}

    def _set_arrays(self, a):
        self.X, self.y = a["X"], a["y"]
