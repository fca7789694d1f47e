"""Nearest class centroid (prototypes, as in SimpleShot / ProtoNets): the class mean of the labeled
vectors, re-normalised; scores are cosine similarities / T. New classes are instant (one more prototype).
"""

from __future__ import annotations

import numpy as np

from embedstore.labels.heads.base import Head, encode_labels, l2n, register


@register
class CentroidHead(Head):
    name = "centroid"
    params = ("T", "center")

    def __init__(self, T: float = 0.05, center: bool = False):
        super().__init__(center)
        self.T = float(T)
        self.W = np.zeros((0, 0), np.float32)
        self.counts = np.zeros(0, np.int64)

    def fit(self, X, y, unlabeled=None):
        X = np.asarray(X, np.float32)
        self._fit_mean(X, None if unlabeled is None else np.asarray(unlabeled, np.float32))
        self.classes, yi = encode_labels(y)
        Xn = self._prep(X)
        C = len(self.classes)
        self.counts = np.bincount(yi, minlength=C)
        S = np.zeros((C, Xn.shape[1]), np.float64)
        np.add.at(S, yi, Xn)
        self.W = l2n(S / self.counts[:, None])
        self._remember(X)
        return self

    def _logits(self, X):
        return (X @ self.W.T) / self.T

    def add_class(self, X, name):
        self._new_class(name)
        Xn = self._prep(X)
        self._remember(X, append=True)
        self.W = np.vstack([self.W, l2n(Xn.mean(0, keepdims=True))])
        self.counts = np.append(self.counts, len(Xn))
        return self

    def _arrays(self):
        return {"W": self.W, "counts": self.counts}

    def _set_arrays(self, a):
        self.W, self.counts = a["W"], a["counts"]
