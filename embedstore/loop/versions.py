"""The closed loop: probe plateau -> fine-tune -> new backbone version -> re-embed -> re-index -> activate.

Versions live in the manifest (`versions`, keyed by the backbone fingerprint; `active_version` picks one).
A fine-tuned version keeps its weights inside the store (models/<version>.pt, loadable as `--weights`
into the same backbone name; models/<version>.json holds the training record) and its vectors in its
own vectors table. Steps, and what a kill at each step leaves:

    1. train (no lock held)            nothing written but models/.tmp-*.pt: the previous version is untouched
    2. register the version            manifest entry with status "embedding"; the active version unchanged
    3. re-embed every image             committed in batches (the ingest pipeline); a rerun of `finetune`
                                        finds the unfinished version and embeds only what is missing
    4. build its FAISS index           a cache: rebuilt when missing
    5. decide and activate             one atomic manifest write: status "ready", active_version switched
                                        only if the new version beats the old one on the labels held out
                                        from training (best-head accuracy; equal accuracy: lower log-loss)

Labels are never touched. `use VERSION` switches back and forth (embedding images added since, if any);
`prune VERSION` drops an inactive version's vectors, index and weights.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch

from embedstore.clock import now_iso
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.ingest.backbones import load_backbone
from embedstore.ingest.backbones.base import Backbone
from embedstore.ingest.ingest import IngestService
from embedstore.labels.classify import ClassifyService
from embedstore.labels.heads import HEADS, make_head
from embedstore.loop.finetune import FinetuneConfig, export_state_dict, train_backbone
from embedstore.loop.plateau import PLATEAU_MARGIN, PLATEAU_WINDOW, plateau_rule
from embedstore.results import AddResult, FinetuneResult, PlateauResult, PruneResult, UseResult, VersionRow
from embedstore.search.search import SearchService
from embedstore.storage import Storage, vectors_table_name

DECISION_HEADS = ("centroid", "knn", "linear", "propagate")  # heads that need no text tower


class LoopService:
    """plateau, finetune, versions, use, prune."""

    def __init__(
        self,
        storage: Storage,
        backbone_for: Callable[[str], Backbone],
        device: Callable[[], str],
        ingest: IngestService,
        search: SearchService,
        classify: ClassifyService,
    ):
        self.storage = storage
        self.backbone_for = backbone_for
        self.device = device
        self.ingest = ingest
        self.search = search
        self.classify = classify

    # ---- plateau ------------------------------------------------------------------------
    def plateau(self, margin: float | None = None, window: int | None = None, version: str | None = None) -> PlateauResult:
        """The plateau rule on the eval history of `version` (default: the active one). See loop/plateau.py."""
        margin = PLATEAU_MARGIN if margin is None else float(margin)
        window = PLATEAU_WINDOW if window is None else int(window)
        version = version or self.storage.active_version
        res = plateau_rule(self.classify.eval_history(version), margin, window)
        res.version = version
        return res

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
        embed_batch_size: int | None = None,
        workers: int | None = None,
        **options,
    ) -> FinetuneResult:
        """Fine-tune the active backbone on the human labels; make, embed, index and maybe activate a new version.

        options go to FinetuneConfig (lr, batch_size (training), blocks, lora_rank, reg, holdout, patience,
        image_size, ...); embed_batch_size/workers are for re-embedding the store with the new version.
        A version left unfinished by a killed run (same parent) is completed instead of training again."""
        known = set(FinetuneConfig.__dataclass_fields__)
        bad = sorted(set(options) - known)
        if bad:
            raise InvalidArgumentError(f"unknown fine-tune option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        cfg = FinetuneConfig(method=method, **({"epochs": int(epochs)} if epochs else {}), **options).check()
        parent = self.storage.active_version
        base = dict(status="", version=None, parent=parent, active=parent, method=method, message="")
        plat = None
        if if_plateau:
            plat = self.plateau(margin, window)
            if not plat.plateau:
                return FinetuneResult(**{**base, "status": "skipped", "message": f"no plateau, nothing done: {plat.reason}"},
                                      plateau=plat)
        unfinished = [v for v, e in self.storage.versions.items() if e.get("status") == "embedding" and e.get("parent") == parent]
        if unfinished:
            version, resumed, record = unfinished[-1], True, None
        else:
            version, record = self._train_version(cfg, progress)
            resumed = False
            if version is None:
                return FinetuneResult(
                    **{**base, "status": "not-improved",
                       "message": "fine-tuning never beat the untouched backbone on the held-out labels; no version made"},
                    plateau=plat, train=record,
                )
        res = self._complete_version(version, progress, embed_batch_size, workers, evaluate)
        res.method, res.resumed, res.plateau = method, resumed, plat
        return res

    def _train_version(self, cfg: FinetuneConfig, progress: bool) -> tuple[str | None, dict]:
        """Step 1 and 2: train a copy of the active backbone; save and register it (not active yet)."""
        st = self.storage
        parent = st.active_version
        labels = self.classify.labels.labels()
        if not labels:
            raise EmptyInputError("no labeled images; label a few images per class before fine-tuning")
        vs = st.vectors(ids=sorted(labels))
        items = [(int(i), p, labels[int(i)]) for i, p in zip(vs.ids, vs.paths)]
        init = {int(i): x for i, x in zip(vs.ids, vs.vectors)}
        info = st.version_info(parent)
        bb = load_backbone(info["name"], st.weights_file(parent), device=self.device())  # a copy to train
        res = train_backbone(bb, items, init, cfg, device=self.device(), progress=progress)
        record = {
            "method": cfg.method, "best_epoch": res.best_epoch, "epochs_run": len(res.history) - 1, "history": res.history,
            "seconds": round(res.seconds, 2), "images_per_second": round(res.images_per_second, 2),
            "trainable_params": res.trainable_params, "device": res.device, "n_train": len(res.train_ids),
            "n_holdout": len(res.holdout_ids), "config": res.config,
        }
        if res.best_epoch == 0:
            return None, record
        st.model_path(parent).parent.mkdir(exist_ok=True)
        tmp = st.model_path(f".tmp-{os.getpid()}")
        torch.save(export_state_dict(bb, res.model), tmp)
        new = load_backbone(info["name"], weights=str(tmp), device="cpu")  # loadable; gives the fingerprint
        version = new.version
        os.replace(tmp, st.model_path(version))
        sidecar = {
            **record, "parent": parent,
            "train": {str(i): labels[i] for i in res.train_ids}, "holdout": {str(i): labels[i] for i in res.holdout_ids},
        }
        st.model_record_path(version).write_text(json.dumps(sidecar, indent=1))
        with st.write_lock():
            st.versions[version] = {
                **new.describe(), "weights": st.model_weights_entry(version), "created": now_iso("microseconds"),
                "parent": parent, "status": "embedding",
                "finetune": {k: record[k] for k in ("method", "best_epoch", "epochs_run", "seconds", "n_train", "n_holdout")},
            }
            st.write_manifest()
        return version, record

    def _complete_version(self, version: str, progress: bool, batch_size, workers, evaluate: bool) -> FinetuneResult:
        """Steps 3-5: embed what the version lacks, index it, compare it with its parent, activate it when better."""
        st = self.storage
        parent = st.version_info(version)["parent"]
        with st.write_lock():
            pending = self.ingest.pending(version)
            res = self.ingest.embed_pending(version, pending, batch_size=batch_size, workers=workers, progress=progress)
            st.compact(vectors_table_name(version))
            try:
                index = self.search.build_index(progress=progress, version=version)
            except Exception as e:  # the index is a cache: search rebuilds it when missing
                index = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        side = json.loads(st.model_record_path(version).read_text())
        old = self._holdout_accuracy(parent, side["train"], side["holdout"])
        new = self._holdout_accuracy(version, side["train"], side["holdout"])
        activated = self._decide(version, parent, old, new)
        eval_run = self.classify.evaluate(episodes=5) if evaluate and activated else None
        return FinetuneResult(
            status="activated" if activated else "kept", version=version, parent=parent, active=st.active_version,
            method=side.get("method", ""), message=_verdict(version, parent, old, new, activated), activated=activated,
            train={k: v for k, v in side.items() if k not in ("train", "holdout")}, reembedded=len(pending),
            errors=res.errors, vectors=st.count(vectors_table_name(version)), images=st.count("images"),
            embed_seconds=round(res.embed_seconds, 2), index=index, holdout={"parent": old, "new": new},
            eval=None if eval_run is None else {"best_head": eval_run.best_head, "best_accuracy": eval_run.best_accuracy},
        )

    def _decide(self, version: str, parent: str, old: dict, new: dict) -> bool:
        """Record the held-out check in the manifest; activate `version` when it beats its parent."""
        st = self.storage
        # better: higher held-out accuracy, or the same accuracy (few held-out images tie often) and a lower log-loss
        better = new["accuracy"] > old["accuracy"] or (new["accuracy"] == old["accuracy"] and new["log_loss"] < old["log_loss"])
        with st.write_lock():
            e = st.versions[version]
            e["status"] = "ready"
            e["holdout"] = {
                "accuracy": new["accuracy"], "parent_accuracy": old["accuracy"], "log_loss": new["log_loss"],
                "parent_log_loss": old["log_loss"], "head": new["head"], "n": new["n"],
            }
            activated = better and st.active_version == parent
            if activated:
                st.manifest["active_version"] = version
            st.write_manifest()
        return activated

    def _holdout_accuracy(self, version: str, train: dict, holdout: dict) -> dict:
        """Best-head accuracy on the held-out labels (never trained on), heads fit on the training labels;
        plus the heads' mean log-loss there (a finer measure on the same images, for ties)."""
        vs = self.storage.vectors(version, ids=sorted(int(i) for i in {**train, **holdout}))
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

    # ---- versions -----------------------------------------------------------------------
    def versions(self) -> list[VersionRow]:
        """Every backbone version, oldest first, with its vector count and latest eval accuracy."""
        hist = self.classify.eval_history("all")
        rows = []
        for v, e in self.storage.versions.items():
            runs = [r for r in hist if r.version == v and r.best_accuracy is not None]
            rows.append(VersionRow(
                version=v, active=v == self.storage.active_version, created=e.get("created"), parent=e.get("parent"),
                backbone=e.get("name"), method=(e.get("finetune") or {}).get("method"), status=e.get("status", "ready"),
                vectors=self.storage.count(vectors_table_name(v)),
                eval_accuracy=runs[-1].best_accuracy if runs else None, eval_n_labels=runs[-1].n_labels if runs else None,
                holdout_accuracy=(e.get("holdout") or {}).get("accuracy"),
            ))
        return sorted(rows, key=lambda r: r.created or "")

    def resolve_version(self, version: str) -> str:
        vs = self.storage.versions
        if version in vs:
            return version
        hits = [v for v in vs if v.startswith(str(version))] if version else []
        if len(hits) == 1:
            return hits[0]
        raise InvalidArgumentError(
            f"{'ambiguous' if hits else 'unknown'} version {version!r}; versions: {', '.join(vs)} "
            "(see `embedstore versions STORE`)"
        )

    def use(self, version: str, progress: bool = False) -> UseResult:
        """Make `version` (a fingerprint or unique prefix) the active one; embeds images it lacks first."""
        st = self.storage
        with st.write_lock():
            version = self.resolve_version(version)
            previous = st.active_version
            pending = self.ingest.pending(version)
            if pending:  # images added while it was inactive (or an unfinished fine-tune)
                self.ingest.embed_pending(version, pending, AddResult(), progress=progress)
            st.versions[version]["status"] = "ready"
            st.manifest["active_version"] = version
            st.write_manifest()
        return UseResult(version, previous, len(pending), st.count(vectors_table_name(version)))

    def prune(self, version: str) -> PruneResult:
        """Delete an inactive version: its vectors table, index files, weights and manifest entry."""
        st = self.storage
        with st.write_lock():
            version = self.resolve_version(version)
            if version == st.active_version:
                raise InvalidArgumentError(f"version {version} is active; `use` another version before pruning it")
            st.drop_table(vectors_table_name(version))
            removed = []
            for p in st.version_files(version):
                if p.exists():
                    p.unlink()
                    removed.append(str(p.relative_to(st.root)))
            del st.versions[version]
            st.write_manifest()
        self.search.index.forget(version)
        return PruneResult(version, removed)


def _verdict(version: str, parent: str, old: dict, new: dict, activated: bool) -> str:
    if activated:
        return (f"new version {version} is active: held-out accuracy {old['accuracy']:.3f} -> {new['accuracy']:.3f}, "
                f"log-loss {old['log_loss']:.3f} -> {new['log_loss']:.3f}")
    return (f"version {version} kept but NOT active: held-out accuracy {new['accuracy']:.3f} (log-loss "
            f"{new['log_loss']:.3f}) does not beat {old['accuracy']:.3f} ({old['log_loss']:.3f}) of {parent}; "
            f"switch anyway with `embedstore use STORE {version}`")
