"""`auto`: choose a head, or an ensemble of heads, by cross-validation on the current labels.

Every candidate (see CANDIDATES; zero-shot and fused join when a text encoder is given) is scored on
stratified out-of-fold predictions of the labels; transductive candidates see the held-out and the
unlabeled vectors, never their labels. Each candidate gets its own temperature on those predictions;
ensembles of the best 2 and 3 (mean of calibrated log-probabilities) compete too. The winner, by
accuracy with log-loss breaking ties, replaces the default (`fallback`, a strong ensemble) only when it
beats it by more than `margin` standard errors of the paired per-label difference (shrinkage toward the
default: a choice among many candidates on few labels is mostly noise); the choice is refitted on all
labels: `head.chosen` names it, `head.note` says why when the default was kept, `head.cv_scores` holds
every candidate's {accuracy, nll}. With a single example of some class there is nothing to hold out:
`fallback` is used (the ensemble that did best over 1-shot episodes in benchmarks/fewshot.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from embedstore.errors import InvalidArgumentError
from embedstore.labels.heads.base import HEADS, Head, check_vectors, encode_labels, register, restore
from embedstore.labels.heads.calibrate import fit_temperature, make_folds, nll

# label -> (head name, parameters); CL2N variants are candidates of their own
CANDIDATES: dict[str, tuple[str, dict]] = {
    "centroid": ("centroid", {}),
    "centroid+cl2n": ("centroid", {"center": True}),
    "knn": ("knn", {}),
    "linear": ("linear", {}),
    "propagate": ("propagate", {}),
    "propagate+cl2n": ("propagate", {"center": True}),
}
TEXT_CANDIDATES: dict[str, tuple[str, dict]] = {"zeroshot": ("zeroshot", {}), "fused": ("fused", {})}
FALLBACK = ("propagate+cl2n", "linear")
# temperatures for when nothing can be held out (a class with one example): typical fitted values on digits
DEFAULT_T = {"propagate": 0.1, "propagate+cl2n": 0.1, "linear": 0.5, "knn": 0.3, "centroid": 0.3, "centroid+cl2n": 0.3}


def log_softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(1, keepdims=True))


# a one-standard-error rule: the CV winner replaces the default only when it beats it by more than this many
# standard errors of the paired difference. benchmarks/fewshot.py (six collections, 10 seeds, 1-16 labels per
# class), auto - best scikit-learn head: plain CV winner +0.045 mean (worst +0.000), margin 1 +0.046 (+0.002),
# always the default +0.046 (+0.002); margin 1 keeps the better heads where the evidence is clear (glyphs at 16
# labels per class: linear 0.900 vs the default 0.879)
MARGIN = 1.0
MIN_SCORED = 10  # labels needed to score candidates when some labels may not score (score_mask)


@register
class AutoHead(Head):
    name = "auto"
    params = ("candidates", "ensemble", "n_splits", "seed", "fallback", "margin")

    def __init__(self, candidates: list[str] | None = None, ensemble: bool = True, n_splits: int = 5, seed: int = 0,
                 fallback: tuple[str, ...] = FALLBACK, margin: float | None = MARGIN, text_encoder: Callable | None = None, center: bool = False):
        super().__init__(center=False)
        self.text_encoder = text_encoder
        self.candidates = list(candidates) if candidates else None
        self.ensemble, self.n_splits, self.seed = bool(ensemble), int(n_splits), int(seed)
        self.fallback = tuple(fallback)
        self.margin = None if margin is None else float(margin)
        self.members: list[Head] = []
        self.chosen: str = ""
        self.cv_scores: dict[str, dict[str, float]] = {}
        self.oof_correct: np.ndarray | None = None  # per label: was the chosen head right out of fold (not saved)
        self.oof_logp: np.ndarray | None = None  # per label: the chosen head's out-of-fold log-probabilities (not saved)
        # per label: may it score the choice? False for images a fine-tuned backbone trained on (their vectors
        # look easier than unseen images'); they still train every candidate. None: all may (not saved)
        self.score_mask: np.ndarray | None = None
        self.note: str = ""  # why the choice was made the way it was, when it is not the plain CV winner
        self.default_kept = False  # the CV winner did not beat the default by more than noise (see _shrink)

    def _catalogue(self, unlabeled) -> dict[str, tuple[str, dict]]:
        cat = dict(CANDIDATES)
        if self.text_encoder is not None:
            cat.update(TEXT_CANDIDATES)
        names = self.candidates or list(cat)
        unknown = [n for n in names if n not in cat]
        if unknown:
            raise InvalidArgumentError(f"unknown auto candidates {unknown}; choose from {list(cat)}")
        return {n: cat[n] for n in names}

    def _make(self, label: str, cat) -> Head:
        name, kw = cat[label]
        kw = dict(kw)
        if name in TEXT_CANDIDATES:
            kw["text_encoder"] = self.text_encoder
        return HEADS[name](**kw)

    def fit(self, X, y, unlabeled=None):
        X = np.asarray(X, np.float32)
        y = [str(c) for c in y]
        self.classes, yi = encode_labels(y)
        cat = self._catalogue(unlabeled)
        folds = make_folds(y, self.n_splits, self.seed)
        sm = np.ones(len(y), bool) if self.score_mask is None else np.asarray(self.score_mask, bool)
        self.note, self.default_kept = "", False
        if folds is not None and sm.sum() < MIN_SCORED:
            folds = None  # too few labels the backbone never trained on to judge candidates fairly
            self.note = (f"only {int(sm.sum())} label(s) were not trained on by this fine-tuned backbone (under "
                         f"{MIN_SCORED}): the default ensemble is used instead of a cross-validated choice")
        elif self.score_mask is not None:
            self.note = f"scored on the {int(sm.sum())} label(s) the fine-tuned backbone never trained on"
        if folds is None:
            labels = [f for f in self.fallback if f in cat] or [next(iter(cat))]
            temps = {lab: DEFAULT_T.get(lab, 1.0) for lab in labels}
            self.cv_scores, self.oof_correct, self.oof_logp = {}, None, None
        else:
            oof, temps = {}, {}
            for lab in cat:
                Z = self._make(lab, cat).cv_logits(X, y, unlabeled, folds)
                temps[lab] = fit_temperature(Z[sm], yi[sm])
                oof[lab] = log_softmax(Z / temps[lab])
            scores = {lab: self._score(Z[sm], yi[sm]) for lab, Z in oof.items()}
            if self.ensemble and len(oof) > 1:
                ranked = sorted(scores, key=lambda k: (-scores[k]["accuracy"], scores[k]["nll"]))
                for m in (2, 3):
                    if len(ranked) >= m:
                        combo = "+".join(ranked[:m])
                        oof[combo] = np.mean([oof[r] for r in ranked[:m]], 0)
                        scores[combo] = self._score(oof[combo][sm], yi[sm])
            best = min(scores, key=lambda k: (-scores[k]["accuracy"], scores[k]["nll"]))
            best = self._shrink(best, oof, scores, yi, sm, cat)
            self.cv_scores = scores
            labels = self._split(best, cat)
            self.oof_correct = oof[best].argmax(1) == yi
            self.oof_logp = oof[best]
        self.members = []
        for lab in labels:
            h = self._make(lab, cat).fit(X, y, unlabeled)
            h.temperature = temps[lab]
            self.members.append(h)
        self.chosen = " + ".join(labels)
        self._remember(X)
        self.temperature = 1.0
        if folds is not None and len(labels) > 1:
            self.temperature = fit_temperature(np.mean([oof[lab] for lab in labels], 0)[sm], yi[sm])
        elif folds is None:
            self.temperature = self._agreement_temperature(unlabeled)
        return self

    def _shrink(self, best: str, oof: dict, scores: dict, yi, sm, cat) -> str:
        """Keep the default ensemble unless the cross-validated winner beats it by more than noise: `margin`
        standard errors of the paired per-label difference in out-of-fold correctness."""
        members = [f for f in self.fallback if f in oof]
        if self.margin is None or len(members) != len(self.fallback) or best == "+".join(members):
            return best
        default = "+".join(members)
        if default not in oof:
            oof[default] = np.mean([oof[m] for m in members], 0)
            scores[default] = self._score(oof[default][sm], yi[sm])
        d = (oof[best][sm].argmax(1) == yi[sm]).astype(float) - (oof[default][sm].argmax(1) == yi[sm])
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        if d.mean() > self.margin * se and d.mean() > 0:
            return best
        self.default_kept = True
        name, a, b = " + ".join(self._split(best, cat)), scores[best]["accuracy"], scores[default]["accuracy"]
        sems = "one standard error" if self.margin == 1 else f"{self.margin:g} standard errors"
        why = (f"the best candidate, {name}, did no better than the default on held-out labels ({a:.3f} vs {b:.3f})"
               if d.mean() <= 0 else
               f"the best candidate, {name}, scored {a:.3f} on held-out labels vs {b:.3f} for the default: a gain of "
               f"{d.mean():+.3f}, within {sems} ({se:.3f}), too thin to trust")
        self.note = (f"{self.note}; " if self.note else "") + why + ", so the default is kept"
        return default

    def _agreement_temperature(self, unlabeled) -> float:
        """With nothing to hold out (one label of some class), calibrate on the unlabeled images: the members'
        agreement rate there is a proxy for accuracy (Jiang et al. 2022, "Assessing generalization of SGD via
        disagreement"), so T is set for the mean top probability to equal it. Without this, the default
        temperatures said 0.9 where 1-shot accuracy was 0.34 (benchmarks/fewshot.py, icons)."""
        if unlabeled is None or len(unlabeled) < 2 or len(self.members) < 2:
            return 1.0
        U = np.asarray(unlabeled, np.float32)
        U = U[np.random.default_rng(self.seed).choice(len(U), min(len(U), 2000), replace=False)]
        Z = [log_softmax(m.logits(U) / m.temperature) for m in self.members]
        top = [z.argmax(1) for z in Z]
        agree = float(np.mean([np.mean(top[i] == top[j]) for i in range(len(top)) for j in range(i + 1, len(top))]))
        Z = np.mean(Z, 0)
        target = min(max(agree, 1.0 / len(self.classes) + 1e-3), 1 - 1e-3)
        lo, hi = np.log(0.02), np.log(50.0)  # mean top probability falls as T grows: bisection on log T
        for _ in range(40):
            mid = (lo + hi) / 2
            if np.exp(log_softmax(Z / np.exp(mid)).max(1)).mean() > target:
                lo = mid
            else:
                hi = mid
        return float(np.exp((lo + hi) / 2))

    @staticmethod
    def _split(best: str, cat) -> list[str]:
        """'propagate+cl2n+linear' -> ['propagate+cl2n', 'linear'] (labels may contain '+')."""
        out, parts = [], best.split("+")
        while parts:
            for n in range(len(parts), 0, -1):
                lab = "+".join(parts[:n])
                if lab in cat:
                    out.append(lab)
                    parts = parts[n:]
                    break
            else:
                raise ValueError(f"cannot parse ensemble '{best}'")
        return out

    @staticmethod
    def _score(logp: np.ndarray, yi: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((logp.argmax(1) == yi).mean()), "nll": nll(logp, yi)}

    def _logits(self, X):
        return np.mean([log_softmax(m.logits(X) / m.temperature) for m in self.members], 0).astype(np.float32)

    def _prep(self, X):  # members prepare their own input
        return check_vectors(X)

    def add_class(self, X, name):
        self._new_class(name)
        self._remember(X, append=True)
        for m in self.members:
            m.add_class(X, name)
        return self

    def clone(self):
        h = super().clone()
        h.text_encoder = self.text_encoder
        return h

    def get_params(self):
        p = super().get_params()
        p["fallback"] = list(self.fallback)
        return p

    def _state(self):
        header, arrays = super()._state()
        header["chosen"], header["cv_scores"], header["members"] = self.chosen, self.cv_scores, []
        header["note"], header["default_kept"] = self.note, self.default_kept
        for i, m in enumerate(self.members):
            h, a = m._state()
            header["members"].append(h)
            arrays.update({f"m{i}__{k}": v for k, v in a.items()})
        return header, arrays

    @classmethod
    def _from_state(cls, header, arrays):
        head = super()._from_state(header, {k: v for k, v in arrays.items() if "__" not in k})
        head.chosen, head.cv_scores = header["chosen"], header["cv_scores"]
        head.note, head.default_kept = header.get("note", ""), bool(header.get("default_kept", False))
        head.members = [
            restore(h, {k.split("__", 1)[1]: v for k, v in arrays.items() if k.startswith(f"m{i}__")})
            for i, h in enumerate(header["members"])
        ]
        return head
