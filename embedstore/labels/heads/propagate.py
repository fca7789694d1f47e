"""Transductive label propagation over the k-NN graph of labeled + unlabeled vectors.

Label spreading (Zhou et al. 2004) on a k-NN graph as in Iscen et al. 2019 ("Label propagation for
deep semi-supervised learning"): edges w_ij = max(s_ij, 0)^gamma between each vector and its k nearest
neighbours (FAISS inner product), W symmetrised and normalised S = D^-1/2 W D^-1/2, then
(I - alpha S) F = Y solved by conjugate gradient per class, with Y the class-balanced one-hot labels.

The graph depends only on the collection, so it is cached: refitting with new labels or `add_class`
re-solves the sparse system without rebuilding it. Vectors outside the graph get the similarity-
weighted average of their nearest nodes' scores (one more diffusion step).
"""

from __future__ import annotations

import hashlib

import numpy as np

from embedstore.labels.heads.base import Head, encode_labels, register

EPS = 1e-6


def knn_graph(X: np.ndarray, k: int):
    """(sims (N, k), neighbours (N, k)) of every row of X among X, excluding itself."""
    import faiss

    index = faiss.IndexFlatIP(X.shape[1])
    index.add(np.ascontiguousarray(X, dtype=np.float32))
    sims, nn = index.search(np.ascontiguousarray(X, dtype=np.float32), k + 1)
    return sims[:, 1:], nn[:, 1:]


def normalized_affinity(sims, nn, gamma: float):
    import scipy.sparse as sp

    N, k = nn.shape
    w = np.maximum(sims, 0).astype(np.float64) ** gamma
    rows = np.repeat(np.arange(N), k)
    ok = nn.ravel() >= 0
    W = sp.csr_matrix((w.ravel()[ok], (rows[ok], nn.ravel()[ok])), shape=(N, N))
    W = W + W.T
    d = np.asarray(W.sum(1)).ravel()
    dinv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    return sp.diags(dinv) @ W @ sp.diags(dinv)


def spread(S, labeled_rows: np.ndarray, y: np.ndarray, n_classes: int, alpha: float) -> np.ndarray:
    """F (N, C): solution of (I - alpha S) F = Y, Y class-balanced one-hot on labeled rows."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    N = S.shape[0]
    A = sp.eye(N, format="csr") - alpha * S
    F = np.zeros((N, n_classes), np.float64)
    counts = np.bincount(y, minlength=n_classes)
    for c in range(n_classes):
        Y = np.zeros(N)
        Y[labeled_rows[y == c]] = 1.0 / max(counts[c], 1)
        F[:, c], _ = cg(A, Y, rtol=1e-6, maxiter=50)
    return F


@register
class PropagateHead(Head):
    name = "propagate"
    params = ("k", "gamma", "alpha", "balance", "center")

    def __init__(self, k: int = 10, gamma: float = 3.0, alpha: float = 0.9, balance: bool = True, center: bool = False):
        super().__init__(center)
        self.balance = bool(balance)
        self.k, self.gamma, self.alpha = int(k), float(gamma), float(alpha)
        self.nodes = np.zeros((0, 0), np.float32)
        self.F = np.zeros((0, 0), np.float32)
        self._graph = None  # (key, S)
        self._labeled_rows = np.zeros(0, np.int64)
        self._y = np.zeros(0, np.int64)

    def fit(self, X, y, unlabeled=None):
        X = np.asarray(X, np.float32)
        U = np.zeros((0, X.shape[1]), np.float32) if unlabeled is None else np.asarray(unlabeled, np.float32)
        self._fit_mean(X, U if len(U) else None)
        self.classes, yi = encode_labels(y)
        nodes = self._prep(np.vstack([X, U]))
        key = self._key(nodes)
        if self._graph is None or self._graph[0] != key:
            k = max(1, min(self.k, len(nodes) - 1))
            self._graph = (key, normalized_affinity(*knn_graph(nodes, k), self.gamma))
        self.nodes = nodes
        self._labeled_rows, self._y = np.arange(len(X)), yi
        self._remember(X)
        self._solve()
        return self

    @staticmethod
    def _key(nodes: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(nodes).tobytes()).hexdigest()

    def _solve(self):
        F = spread(self._graph[1], self._labeled_rows, self._y, len(self.classes), self.alpha)
        F = np.maximum(F, 0)
        if self.balance:  # each class's mass sums to 1 (Iscen et al.): big or central classes do not swamp small ones
            F = F / np.maximum(F.sum(0, keepdims=True), 1e-12)
        self.F = (F / np.maximum(F.sum(1, keepdims=True), 1e-12)).astype(np.float32)

    def _logits(self, X):
        S = X @ self.nodes.T
        k = max(1, min(self.k, S.shape[1]))
        nn = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else np.tile(np.arange(S.shape[1]), (len(S), 1))
        sims = np.take_along_axis(S, nn, 1)
        w = np.maximum(sims, 0) ** self.gamma + 1e-12
        P = np.einsum("mk,mkc->mc", w, self.F[nn]) / w.sum(1, keepdims=True)
        exact = sims.max(1) >= 1 - 1e-5  # a node of the graph: its own propagated scores
        if exact.any():
            P[exact] = self.F[nn[exact, sims[exact].argmax(1)]]
        return np.log(P + EPS).astype(np.float32)

    def cv_logits(self, X, y, unlabeled=None, folds=None):
        """Out-of-fold logits reusing one graph over labeled + unlabeled: each fold only hides labels."""
        h = self.clone().fit(X, y, unlabeled)
        yi = h._y
        out = np.zeros((len(yi), len(h.classes)), np.float32)
        for tr, te in folds:
            h._labeled_rows, h._y = tr, yi[tr]
            h._solve()
            out[te] = np.log(h.F[te] + EPS)
        return out

    def add_class(self, X, name):
        self._new_class(name)
        Xn = self._prep(X)
        if self._graph is None:  # loaded from disk: no graph kept; fall back to refitting on the nodes
            raise NotImplementedError("a loaded propagate head has no graph; refit it with fit(X, y, unlabeled)")
        rows = self._match(Xn)
        self._remember(X, append=True)
        self._labeled_rows = np.concatenate([self._labeled_rows, rows])
        self._y = np.concatenate([self._y, np.full(len(rows), len(self.classes) - 1)])
        self._solve()
        return self

    def _match(self, Xn):
        """Graph rows holding these vectors (new vectors must be part of the collection the graph was built on)."""
        S = Xn @ self.nodes.T
        rows = S.argmax(1)
        new = S[np.arange(len(Xn)), rows] < 1 - 1e-4
        if new.any():  # vectors outside the collection the graph was built on: add them as nodes, rebuild
            rows[new] = len(self.nodes) + np.arange(int(new.sum()))
            self.nodes = np.vstack([self.nodes, Xn[new]])
            k = max(1, min(self.k, len(self.nodes) - 1))
            self._graph = (self._key(self.nodes), normalized_affinity(*knn_graph(self.nodes, k), self.gamma))
        return rows

    def _arrays(self):
        return {"nodes": self.nodes, "F": self.F}

    def _set_arrays(self, a):
        self.nodes, self.F = a["nodes"], a["F"]
