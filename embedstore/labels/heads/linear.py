"""Linear probe: multinomial logistic regression on the (optionally CL2N-centred) vectors.

Objective as scikit-learn's LogisticRegression(lbfgs): mean cross-entropy + ||W||^2 / (2 C N), solved
full-batch with torch L-BFGS (on the GPU when present). C is chosen by stratified cross-validation on
the labels from `Cs` (needs >= 2 examples per class; otherwise `C` is used). `add_class` warm-starts:
a new row initialised from the class mean, then a few L-BFGS steps on the labeled set only (never
the collection).
"""

from __future__ import annotations

import numpy as np
import torch

from embedstore.labels.heads.base import Head, encode_labels, few_threads, register

CS = (1.0, 10.0, 100.0, 1000.0)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit_logreg(X, y, n_classes, C, W0=None, b0=None, max_iter=100, device="auto", balanced=False):
    """(W (C, D), b (C,)) minimising mean CE + ||W||^2 / (2 C N); balanced: each class's examples weigh
    N / (classes x its count) (scikit-learn's class_weight="balanced"), so every class counts the same.

    With fewer examples than dimensions (the few-shot case) the optimum lies in the row space of X
    (representer theorem), so the problem is solved in that basis (rank <= N) and mapped back: exact,
    and far cheaper than in D dimensions."""
    X = np.asarray(X, np.float32)
    if len(X) < X.shape[1]:
        with few_threads():
            Q, R = np.linalg.qr(X.T)  # X = R^T Q^T, Q (D, N) orthonormal: an exact basis of the row space
        Wz0 = None if W0 is None else np.asarray(W0, np.float32) @ Q
        Wz, b = fit_logreg(np.ascontiguousarray(R.T), y, n_classes, C, Wz0, b0, max_iter, device, balanced)
        return (Wz @ Q.T).astype(np.float32), b
    dev = _device(device)
    if dev.type == "cpu":
        return _fit_sklearn(X, y, n_classes, C, W0, b0, max_iter, balanced)
    return _fit_torch(X, y, n_classes, C, W0, b0, max_iter, dev, balanced)


def _fit_torch(X, y, n_classes, C, W0, b0, max_iter, dev: torch.device, balanced=False):
    """The objective with torch L-BFGS, full batch on `dev` (the GPU path; also runs on the CPU)."""
    Xt = torch.as_tensor(X, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(y, dtype=torch.long, device=dev)
    D = Xt.shape[1]
    W = torch.zeros(n_classes, D, device=dev) if W0 is None else torch.as_tensor(W0, dtype=torch.float32, device=dev).clone()
    b = torch.zeros(n_classes, device=dev) if b0 is None else torch.as_tensor(b0, dtype=torch.float32, device=dev).clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    lam = 1.0 / (C * len(Xt))
    cw = None
    if balanced:
        cnt = torch.bincount(yt, minlength=n_classes).float()
        cw = torch.where(cnt > 0, len(yt) / (int((cnt > 0).sum()) * cnt.clamp(min=1)), torch.zeros_like(cnt))
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xt @ W.T + b, yt, weight=cw) + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), few_threads(dev.type == "cpu" and Xt.numel() < 1_000_000):
        opt.step(closure)
    return W.detach().cpu().numpy(), b.detach().cpu().numpy()


def _fit_sklearn(X, y, n_classes, C, W0, b0, max_iter, balanced=False):
    """The same objective with scikit-learn's lbfgs (sum CE * C + ||W||^2 / 2), warm-started from (W0, b0)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    m = LogisticRegression(C=C, max_iter=max(max_iter, 100) * 5, warm_start=W0 is not None, tol=1e-4,
                           class_weight="balanced" if balanced else None)
    if W0 is not None and len(present) == n_classes:
        m.coef_, m.intercept_ = np.asarray(W0, np.float64), np.asarray(b0, np.float64)
    with warnings.catch_warnings(), few_threads(X.size < 1_000_000):
        warnings.simplefilter("ignore", ConvergenceWarning)
        m.fit(X, y)
    W = np.zeros((n_classes, X.shape[1]), np.float32)
    b = np.full(n_classes, -1e4 if len(present) < n_classes else 0.0, np.float32)
    if len(present) == 2 and n_classes >= 2:  # binary: sklearn keeps one row (w for the second class)
        W[present[1]], b[present[1]] = m.coef_[0] / 2, m.intercept_[0] / 2
        W[present[0]], b[present[0]] = -m.coef_[0] / 2, -m.intercept_[0] / 2
    else:
        W[present], b[present] = m.coef_, m.intercept_
    return W, b


def stratified_folds(y: np.ndarray, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))


@register
class LinearHead(Head):
    name = "linear"
    params = ("C", "Cs", "center", "device", "balanced")

    def __init__(self, C: float = 10.0, Cs=CS, center: bool = False, device: str = "auto", balanced: bool = True):
        super().__init__(center)
        self.balanced = bool(balanced)
        self.C = float(C)
        self.Cs = tuple(float(c) for c in Cs) if Cs else ()
        self.device = device
        self.W = np.zeros((0, 0), np.float32)
        self.b = np.zeros(0, np.float32)
        self.Xtr = np.zeros((0, 0), np.float32)
        self.ytr = np.zeros(0, np.int64)
        self.cv_scores: dict[float, float] = {}

    def fit(self, X, y, unlabeled=None):
        X = np.asarray(X, np.float32)
        self._fit_mean(X, None if unlabeled is None else np.asarray(unlabeled, np.float32))
        self.classes, yi = encode_labels(y)
        Xn = self._prep(X)
        self.C = self._choose_C(Xn, yi)
        self.Xtr, self.ytr = Xn, yi
        self._remember(X)
        self.W, self.b = fit_logreg(Xn, yi, len(self.classes), self.C, device=self.device, balanced=self.balanced)
        return self

    def _choose_C(self, X, y) -> float:
        """The weakest regularisation (largest C) whose out-of-fold accuracy is within one standard error of the
        best C's (paired per label). CV trains on 2/3 of the labels, so it leans towards more regularisation than
        all the labels need, and its choice among four Cs on a few dozen labels is mostly noise. Linear alone on
        benchmarks/fewshot.py's collections (2-16 labels per class, 6 seeds), digits / glyphs: the plain CV winner
        0.757 / 0.745, this rule 0.763 / 0.747, C = 1000 always 0.768 / 0.749; the other four within 0.002."""
        counts = np.bincount(y)
        if len(self.Cs) < 2 or counts.min() < 2 or len(counts) < 2:
            return self.C
        folds = stratified_folds(y, min(3, int(counts.min())))
        self.cv_scores, right = {}, {}
        for C in self.Cs:
            right[C], nll = np.zeros(len(y)), 0.0
            for tr, te in folds:
                W, b = fit_logreg(X[tr], y[tr], len(counts), C, max_iter=50, device=self.device, balanced=self.balanced)
                Z = X[te] @ W.T + b
                Z = Z - Z.max(1, keepdims=True)
                logp = Z - np.log(np.exp(Z).sum(1, keepdims=True))
                right[C][te] = Z.argmax(1) == y[te]
                nll -= float(logp[np.arange(len(te)), y[te]].sum())
            self.cv_scores[C] = float(right[C].mean()) - 1e-6 * nll / len(y)  # accuracy, NLL breaks ties
        best = max(self.cv_scores, key=self.cv_scores.get)
        for C in sorted(self.Cs, reverse=True):
            d = right[best] - right[C]
            if d.mean() <= d.std(ddof=1) / np.sqrt(len(d)):
                return C
        return best

    def cv_logits(self, X, y, unlabeled=None, folds=None):
        """C is chosen once on all labels, then each fold is fitted with it (no nested CV)."""
        C = self.clone().fit(X, y, unlabeled).C
        fixed = type(self)(C=C, Cs=(), center=self.center, device=self.device, balanced=self.balanced)
        return Head.cv_logits(fixed, X, y, unlabeled, folds)

    def _logits(self, X):
        return (X @ self.W.T + self.b).astype(np.float32)

    def add_class(self, X, name):
        self._new_class(name)
        Xn = self._prep(X)
        self._remember(X, append=True)
        c = len(self.classes) - 1
        scale = float(np.linalg.norm(self.W, axis=1).mean()) if len(self.W) else 1.0
        w0 = Xn.mean(0) / max(float(np.linalg.norm(Xn.mean(0))), 1e-12) * scale
        W0 = np.vstack([self.W, w0[None]])
        b0 = np.append(self.b, self.b.mean() if len(self.b) else 0.0)
        self.Xtr = np.vstack([self.Xtr, Xn])
        self.ytr = np.concatenate([self.ytr, np.full(len(Xn), c)])
        self.W, self.b = fit_logreg(self.Xtr, self.ytr, c + 1, self.C, W0=W0, b0=b0, max_iter=30, device=self.device,
                                    balanced=self.balanced)
        return self

    def _arrays(self):
        return {"W": self.W, "b": self.b, "Xtr": self.Xtr, "ytr": self.ytr}

    def _set_arrays(self, a):
        self.W, self.b, self.Xtr, self.ytr = a["W"], a["b"], a["Xtr"], a["ytr"]

    def get_params(self):
        p = super().get_params()
        p["Cs"] = list(self.Cs)
        return p
