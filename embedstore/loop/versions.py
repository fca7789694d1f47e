"""The closed loop: probe plateau -> fine-tune -> new backbone version -> re-embed -> re-index -> activate.

Versions live in the manifest (`versions`, keyed by the backbone fingerprint; `active_version` picks one).
A fine-tuned version keeps its weights inside the store (models/<version>.pt, loadable as `--weights`
into the same backbone name; models/<version>.json holds the training record) and its vectors in the
table vectors_<version>. Steps, and what a kill at each step leaves:

    1. train (no lock held)            nothing written but models/.tmp-*.pt: the previous version is untouched
    2. register the version            manifest entry with status "embedding"; the active version unchanged
    3. re-embed every image             committed in batches (the `add` pipeline); a rerun of `finetune`
                                        finds the unfinished version and embeds only what is missing
    4. build its FAISS index           a cache: rebuilt when missing
    5. decide and activate             one atomic manifest write: status "ready", active_version switched
                                        only if the new version beats the old one on the labels held out
                                        from training (best-head accuracy; equal accuracy: lower log-loss)

Labels are never touched. `use VERSION` switches back and forth (embedding images added since, if any);
`prune VERSION` drops an inactive version's vectors, index and weights.

Plateau rule (plateau_rule): from the eval history of the active version (one run per label count, the
latest run kept when several), the best head's accuracy gained less than `margin` (default 0.01) over the
last `window` (default 2) label additions: acc[-1] - acc[-1 - window] < margin. Fewer label counts than
window + 1: no plateau yet. A run with fewer labels than the one before (labels removed) restarts the curve.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from embedstore.errors import EmptyInputError, InvalidArgumentError

PLATEAU_MARGIN = 0.01
PLATEAU_WINDOW = 2
DECISION_HEADS = ("centroid", "knn", "linear", "propagate")  # heads that need no text tower


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def plateau_rule(history: Sequence[dict], margin: float = PLATEAU_MARGIN, window: int = PLATEAU_WINDOW) -> dict:
    """Apply the plateau rule to eval runs (oldest first; each with n_labels and best_accuracy).

    Returns {plateau, reason, gain, margin, window, points: [{n_labels, accuracy}]}.
    """
    if margin < 0 or window < 1:
        raise InvalidArgumentError(f"plateau rule needs margin >= 0 and window >= 1; got margin={margin}, window={window}")
    points: list[dict] = []
    for run in history:
        acc, n = run.get("best_accuracy"), run.get("n_labels")
        if acc is None or n is None:
            continue
        p = {"n_labels": int(n), "accuracy": float(acc)}
        if points and p["n_labels"] == points[-1]["n_labels"]:
            points[-1] = p  # the latest run at this label count
        elif points and p["n_labels"] < points[-1]["n_labels"]:
            points = [p]  # labels were removed: the learning curve starts again
        else:
            points.append(p)
    out = {"plateau": False, "gain": None, "margin": margin, "window": window, "points": points}
    if len(points) < window + 1:
        out["reason"] = (
            f"eval runs at {len(points)} label count(s); the rule needs {window + 1}: "
            "label more images and run `embedstore eval` after each batch"
        )
        return out
    a, b = points[-1 - window], points[-1]
    gain = b["accuracy"] - a["accuracy"]
    out["gain"] = round(gain, 4)
    out["plateau"] = gain < margin
    verb = "gained only" if out["plateau"] else "gained"
    out["reason"] = (
        f"best-head accuracy {verb} {gain:+.3f} ({a['accuracy']:.3f} -> {b['accuracy']:.3f}) over the last "
        f"{window} label additions ({a['n_labels']} -> {b['n_labels']} labels); margin {margin}"
    )
    return out


class LoopMixin:
    """plateau, finetune, versions, use, prune: the fine-tune loop of the Store."""

    # ---- plateau ------------------------------------------------------------------------
    def plateau(self, margin: float | None = None, window: int | None = None, version: str | None = None) -> dict:
        """The plateau rule on the eval history of `version` (default: the active one). See plateau_rule."""
        margin = PLATEAU_MARGIN if margin is None else float(margin)
        window = PLATEAU_WINDOW if window is None else int(window)
        version = version or self.active_version
        return {**plateau_rule(self.eval_history(version), margin, window), "version": version}

    # ---- fine-tune ----------------------------------------------------------------------
    def finetune(
        self,
        method: str = "lora",
        epochs: int | None = None,
        if_plateau: bool = False,
        progress: bool = True,
        *,
        margin: float | None = None,
        window: int | None = None,
        evaluate: bool = False,
        batch_size: int | None = None,
        workers: int | None = None,
        **options,
    ) -> dict:
        """Fine-tune the active backbone on the human labels; make, embed, index and maybe activate a new version.

        options go to FinetuneConfig (lr, blocks, lora_rank, reg, holdout, patience, image_size, ...).
        A version left unfinished by a killed run (same parent) is completed instead of training again.
        Returns dict(status: activated|kept|not-improved|skipped, version, parent, active, message, ...).
        """
        from embedstore.loop.finetune import FinetuneConfig

        known = set(FinetuneConfig.__dataclass_fields__)
        bad = sorted(set(options) - known)
        if bad:
            raise InvalidArgumentError(f"unknown fine-tune option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        cfg = FinetuneConfig(method=method, **({"epochs": int(epochs)} if epochs else {}), **options).check()
        parent = self.active_version
        out: dict = {"parent": parent, "method": method}
        if if_plateau:
            plat = self.plateau(margin, window)
            out["plateau"] = plat
            if not plat["plateau"]:
                return {
                    **out, "status": "skipped", "version": None, "active": parent,
                    "message": f"no plateau, nothing done: {plat['reason']}",
                }
        unfinished = [v for v, e in self.manifest["versions"].items() if e.get("status") == "embedding" and e.get("parent") == parent]
        if unfinished:
            version, out["resumed"] = unfinished[-1], True
        else:
            version, record = self._train_version(cfg, progress)
            out["resumed"] = False
            if version is None:
                return {
                    **out, "status": "not-improved", "version": None, "active": parent, "train": record,
                    "message": "fine-tuning never beat the untouched backbone on the held-out labels; no version made",
                }
        return {**out, **self._complete_version(version, progress, batch_size, workers, evaluate)}

    def _train_version(self, cfg, progress: bool) -> tuple[str | None, dict]:
        import torch

        from embedstore.ingest.backbones import load_backbone
        from embedstore.loop.finetune import export_state_dict, train_backbone

        parent = self.active_version
        labels = self.labels()
        if not labels:
            raise EmptyInputError("no labeled images; label a few images per class before fine-tuning")
        vs = self.vectors(ids=sorted(labels))
        items = [(int(i), p, labels[int(i)]) for i, p in zip(vs.ids, vs.paths)]
        init = {int(i): x for i, x in zip(vs.ids, vs.vectors)}
        bb = self._load_version(parent)
        res = train_backbone(bb, items, init, cfg, device=self.device, progress=progress)
        record = {
            "method": cfg.method,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history) - 1,
            "history": res.history,
            "seconds": round(res.seconds, 2),
            "images_per_second": round(res.images_per_second, 2),
            "trainable_params": res.trainable_params,
            "device": res.device,
            "n_train": len(res.train_ids),
            "n_holdout": len(res.holdout_ids),
            "config": res.config,
        }
        if res.best_epoch == 0:
            return None, record
        models = self.root / "models"
        models.mkdir(exist_ok=True)
        tmp = models / f".tmp-{os.getpid()}.pt"
        torch.save(export_state_dict(bb, res.model), tmp)
        new = load_backbone(self.version_info(parent)["name"], weights=str(tmp), device="cpu")  # loadable, fingerprint
        version = new.version
        os.replace(tmp, models / f"{version}.pt")
        sidecar = {
            **record,
            "parent": parent,
            "train": {str(i): labels[i] for i in res.train_ids},
            "holdout": {str(i): labels[i] for i in res.holdout_ids},
        }
        (models / f"{version}.json").write_text(json.dumps(sidecar, indent=1))
        with self.write_lock():
            self.manifest["versions"][version] = {
                **new.describe(),
                "weights": f"models/{version}.pt",  # relative: the store can move
                "created": _now(),
                "parent": parent,
                "status": "embedding",
                "finetune": {k: record[k] for k in ("method", "best_epoch", "epochs_run", "seconds", "n_train", "n_holdout")},
            }
            self._write_manifest()
        return version, record

    def _complete_version(self, version: str, progress: bool, batch_size, workers, evaluate: bool) -> dict:
        """Embed what the version lacks, index it, compare it with its parent, activate it when better."""
        from embedstore.store import AddResult

        entry = self.version_info(version)
        parent = entry["parent"]
        res = AddResult()
        with self.write_lock():
            pending = self.pending_images(version)
            self._embed_pending(pending, res, batch_size=batch_size, workers=workers, progress=progress, version=version)
            try:
                self.vectors_table(version).optimize()
            except Exception:  # compaction is an optimisation only
                pass
            index = None
            if hasattr(self, "build_index"):
                try:
                    with self._as_active(version):
                        index = self.build_index(progress=progress)
                except Exception as e:  # the index is a cache: search rebuilds it when missing
                    index = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        n_vectors = self.vectors_table(version).count_rows()
        side = json.loads((self.root / "models" / f"{version}.json").read_text())
        old = self._holdout_accuracy(parent, side["train"], side["holdout"])
        new = self._holdout_accuracy(version, side["train"], side["holdout"])
        # better: higher held-out accuracy, or the same accuracy (few held-out images tie often) and a lower log-loss
        better = new["accuracy"] > old["accuracy"] or (
            new["accuracy"] == old["accuracy"] and new["log_loss"] < old["log_loss"]
        )
        with self.write_lock():
            e = self.manifest["versions"][version]
            e["status"] = "ready"
            e["holdout"] = {
                "accuracy": new["accuracy"], "parent_accuracy": old["accuracy"], "log_loss": new["log_loss"],
                "parent_log_loss": old["log_loss"], "head": new["head"], "n": new["n"],
            }
            activated = better and self.active_version == parent
            if activated:
                self.manifest["active_version"] = version
            self._write_manifest()
        eval_run = None
        if evaluate and activated:
            eval_run = self.evaluate(episodes=5)
        verdict = (
            f"new version {version} is active: held-out accuracy {old['accuracy']:.3f} -> {new['accuracy']:.3f}, "
            f"log-loss {old['log_loss']:.3f} -> {new['log_loss']:.3f}"
            if activated
            else f"version {version} kept but NOT active: held-out accuracy {new['accuracy']:.3f} (log-loss "
            f"{new['log_loss']:.3f}) does not beat {old['accuracy']:.3f} ({old['log_loss']:.3f}) of {parent}; "
            f"switch anyway with `embedstore use STORE {version}`"
        )
        return {
            "status": "activated" if activated else "kept",
            "version": version,
            "active": self.active_version,
            "activated": activated,
            "reembedded": len(pending),
            "errors": res.errors,
            "vectors": n_vectors,
            "images": self.count_images(),
            "embed_seconds": round(res.embed_seconds, 2),
            "index": index,
            "holdout": {"parent": old, "new": new},
            "eval": None if eval_run is None else {"best_head": eval_run["best_head"], "best_accuracy": eval_run["best_accuracy"]},
            "train": {k: v for k, v in side.items() if k not in ("train", "holdout")},
            "message": verdict,
        }

    def _holdout_accuracy(self, version: str, train: dict, holdout: dict) -> dict:
        """Best-head accuracy on the held-out labels (never trained on), heads fit on the training labels;
        plus the heads' mean log-loss there (a finer measure on the same images, for ties)."""
        from embedstore.labels.heads import HEADS, make_head

        vs = self.vectors(version, ids=sorted(int(i) for i in {**train, **holdout}))
        pos = {int(i): k for k, i in enumerate(vs.ids)}
        tr = [pos[int(i)] for i in train if int(i) in pos]
        ho = [pos[int(i)] for i in holdout if int(i) in pos]
        if not tr or not ho:
            raise EmptyInputError(f"version {version} has no vectors for the fine-tune's labeled images; run finetune again")
        ytr = [train[str(int(vs.ids[k]))] for k in tr]
        yho = [holdout[str(int(vs.ids[k]))] for k in ho]
        acc, loss = {}, {}
        for name in DECISION_HEADS:
            if name not in HEADS:
                continue
            h = make_head(name).fit(vs.vectors[tr], ytr, unlabeled=vs.vectors[ho])
            P = np.asarray(h.predict_proba(vs.vectors[ho]), np.float64)
            cls = list(h.classes)
            truth = np.array([cls.index(c) if c in cls else -1 for c in yho])
            p_true = np.where(truth >= 0, P[np.arange(len(ho)), np.maximum(truth, 0)], 0.0)
            acc[name] = round(float(np.mean(P.argmax(1) == truth)), 4)
            loss[name] = round(float(np.mean(-np.log(np.clip(p_true, 1e-6, 1.0)))), 4)
        best = max(acc, key=acc.get)
        return {
            "accuracy": acc[best], "head": best, "heads": acc, "log_loss": round(float(np.mean(list(loss.values()))), 4),
            "head_log_loss": loss, "n": len(ho),
        }

    @contextmanager
    def _as_active(self, version: str):
        """In memory only (never written): lets active-version code (index building) work on `version`.

        Use inside write_lock(), so no nested lock reloads the manifest meanwhile.
        """
        old = self.manifest["active_version"]
        self.manifest["active_version"] = version
        try:
            yield
        finally:
            self.manifest["active_version"] = old

    # ---- versions -----------------------------------------------------------------------
    def versions(self) -> list[dict]:
        """Every backbone version, oldest first: {version, active, created, parent, backbone, method, status,
        vectors, eval_accuracy (latest `eval` run's best-head accuracy, None if never evaluated), eval_n_labels,
        holdout_accuracy (fine-tuned versions: the activation check)}."""
        try:
            hist = self.eval_history("all")
        except Exception:  # no evals table yet
            hist = []
        rows = []
        for v, e in self.manifest["versions"].items():
            runs = [r for r in hist if r.get("version") == v and r.get("best_accuracy") is not None]
            vt = self.vectors_table(v)
            rows.append(
                {
                    "version": v,
                    "active": v == self.active_version,
                    "created": e.get("created"),
                    "parent": e.get("parent"),
                    "backbone": e.get("name"),
                    "method": (e.get("finetune") or {}).get("method"),
                    "status": e.get("status", "ready"),
                    "vectors": 0 if vt is None else vt.count_rows(),
                    "eval_accuracy": runs[-1]["best_accuracy"] if runs else None,
                    "eval_n_labels": runs[-1]["n_labels"] if runs else None,
                    "holdout_accuracy": (e.get("holdout") or {}).get("accuracy"),
                }
            )
        return sorted(rows, key=lambda r: r["created"] or "")

    def _resolve_version(self, version: str) -> str:
        vs = self.manifest["versions"]
        if version in vs:
            return version
        hits = [v for v in vs if v.startswith(str(version))] if version else []
        if len(hits) == 1:
            return hits[0]
        raise InvalidArgumentError(
            f"{'ambiguous' if hits else 'unknown'} version {version!r}; versions: {', '.join(vs)} "
            "(see `embedstore versions STORE`)"
        )

    def use(self, version: str, progress: bool = False) -> dict:
        """Make `version` (a fingerprint or unique prefix) the active one; embeds images it lacks first."""
        from embedstore.store import AddResult

        with self.write_lock():
            version = self._resolve_version(version)
            previous = self.active_version
            pending = self.pending_images(version)
            res = AddResult()
            if pending:  # images added while it was inactive (or an unfinished fine-tune)
                self._embed_pending(pending, res, batch_size=None, workers=None, progress=progress, version=version)
            self.manifest["versions"][version]["status"] = "ready"
            self.manifest["active_version"] = version
            self._write_manifest()
        return {"version": version, "previous": previous, "embedded": len(pending), "vectors": self.vectors_table(version).count_rows()}

    def prune(self, version: str) -> dict:
        """Delete an inactive version: its vectors table, index files, weights and manifest entry."""
        with self.write_lock():
            version = self._resolve_version(version)
            if version == self.active_version:
                raise InvalidArgumentError(f"version {version} is active; `use` another version before pruning it")
            from embedstore.store import vectors_table_name

            name = vectors_table_name(version)
            if name in self.table_names():
                self.db.drop_table(name)
            removed = []
            for p in (
                self.root / "index" / f"{version}.faiss",
                self.root / "index" / f"{version}.json",
                self.root / "models" / f"{version}.pt",
                self.root / "models" / f"{version}.json",
            ):
                if p.exists():
                    p.unlink()
                    removed.append(str(p.relative_to(self.root)))
            del self.manifest["versions"][version]
            self._write_manifest()
        return {"pruned": version, "files": removed}

    def info_loop(self) -> dict:
        vs = self.manifest["versions"]
        return {
            "finetuned_versions": sum(1 for e in vs.values() if e.get("parent")),
            "unfinished_versions": [v for v, e in vs.items() if e.get("status") == "embedding"],
        }
