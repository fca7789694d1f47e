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
                                        only if the new version is better on the decision labels (never
                                        trained or selected on; see loop/decide.py) by more than the margin,
                                        and search on the other images did not degrade (loop/forgetting.py)

Which labels the backbone trained on (and selected epochs on) is recorded in the version's manifest entry
(`finetune.trained_ids`, `finetune.selection_ids`, `finetune.decision_ids`) and in models/<version>.json:
heads fit afterwards must not treat those images as unseen when they cross-validate or calibrate.

Labels are never touched. `use VERSION` switches back and forth (embedding images added since, if any);
`prune VERSION` drops an inactive version's vectors, index and weights.
"""

from __future__ import annotations

import dataclasses
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
from embedstore.loop.decide import (
    decide,
    head_correctness,
    labels_needed,
    paired_comparison,
)
from embedstore.loop.finetune import (
    FinetuneConfig,
    export_state_dict,
    split_holdout,
    train_backbone,
)
from embedstore.loop.forgetting import forgetting_warning, near_duplicate_recall
from embedstore.loop.plateau import PLATEAU_MARGIN, PLATEAU_WINDOW, plateau_rule
from embedstore.loop.pseudo import make_pool, pseudo_labels, relabel
from embedstore.results import (
    AddResult,
    FinetuneResult,
    PlateauResult,
    PruneResult,
    UseResult,
    VersionRow,
)
from embedstore.search.search import SearchService
from embedstore.storage import Storage, vectors_table_name


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
        method: str = "last-blocks",
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
            folds = self._folds(cfg)
            if isinstance(folds, str):
                return FinetuneResult(**{**base, "status": "too-few-labels", "message": folds}, plateau=plat)
            version, record = self._train_version(cfg, progress, *folds)
            resumed = False
            if version is None:
                return FinetuneResult(
                    **{**base, "status": "not-improved",
                       "message": "fine-tuning never beat the untouched backbone on the selection labels; no version made"},
                    plateau=plat, train=record,
                )
        res = self._complete_version(version, progress, embed_batch_size, workers, evaluate, cfg)
        res.method, res.resumed, res.plateau = method, resumed, plat
        return res

    def _folds(self, cfg: FinetuneConfig) -> tuple[dict, dict] | str:
        """({id: class} the backbone may train/select on, {id: class} kept for the decision), or why there
        are too few labels to decide (then nothing is trained)."""
        labels = self.classify.labels.labels()
        if not labels:
            raise EmptyInputError("no labeled images; label a few images per class before fine-tuning")
        ids = sorted(labels)
        fit, dec = split_holdout(ids, [labels[i] for i in ids], cfg.decide, cfg.seed + 1)
        if len(dec) < cfg.min_decide:
            n_cls = len(set(labels.values()))
            need = labels_needed(n_cls, cfg.decide, cfg.min_decide)
            return (f"too few labels to decide whether a fine-tune helps: {len(ids)} labels keep {len(dec)} out for "
                    f"the decision ({cfg.decide:.0%} of each class), at least {cfg.min_decide} needed; label about "
                    f"{need} images per class ({need * n_cls} labels) first. Nothing trained.")
        return {i: labels[i] for i in fit}, {i: labels[i] for i in dec}

    def _train_version(self, cfg: FinetuneConfig, progress: bool, labels: dict, decision: dict) -> tuple[str | None, dict]:
        """Step 1 and 2: train a copy of the active backbone on `labels` (never on `decision`); save and
        register it (not active yet)."""
        st = self.storage
        parent = st.active_version
        vs = st.vectors(ids=sorted(labels))
        items = [(int(i), p, labels[int(i)]) for i, p in zip(vs.ids, vs.paths)]
        init = {int(i): x for i, x in zip(vs.ids, vs.vectors)}
        info = st.version_info(parent)
        pool = make_pool(self.classify, st, parent, vs, labels, cfg.pseudo_threshold, cfg.pseudo_per_label, cfg.seed)
        pseudo, pseudo_summary = pseudo_labels(self.classify, pool)
        bb = load_backbone(info["name"], st.weights_file(parent), device=self.device())  # a copy to train
        res = train_backbone(bb, items, init, cfg, device=self.device(), progress=progress, pseudo=pseudo)
        flip, kept = res.flip, [pseudo_summary["kept"]]
        for _ in range(2, cfg.pseudo_rounds + 1 if pseudo else 0):  # Noisy-Student rounds: re-label, train again
            pseudo, pseudo_summary = relabel(pool, bb, res.model)
            kept.append(pseudo_summary["kept"])
            res = train_backbone(bb, items, init, dataclasses.replace(cfg, flip=flip["flip"]), device=self.device(),
                                 progress=progress, pseudo=pseudo)  # the flip check is not redone
        if len(kept) > 1:
            pseudo_summary = {**pseudo_summary, "rounds": kept}
        record = {
            "method": cfg.method, "best_epoch": res.best_epoch, "epochs_run": len(res.history) - 1, "history": res.history,
            "seconds": round(res.seconds, 2), "images_per_second": round(res.images_per_second, 2),
            "trainable_params": res.trainable_params, "device": res.device, "n_train": len(res.train_ids),
            "n_holdout": len(res.holdout_ids), "n_decision": len(decision), "config": res.config,
            "probe_losses": res.probe_losses, "wise_alpha": res.wise_alpha, "wise_losses": res.wise_losses,
            "n_pseudo": len(res.pseudo_ids), "pseudo": pseudo_summary, "flip": flip,
        }
        if res.best_epoch == 0:
            return None, record
        st.model_path(parent).parent.mkdir(exist_ok=True)
        tmp = st.model_path(f".tmp-{os.getpid()}")
        torch.save(export_state_dict(bb, res.model), tmp)
        new = load_backbone(info["name"], weights=str(tmp), device="cpu")  # loadable; gives the fingerprint
        version = new.version
        os.replace(tmp, st.model_path(version))
        trained_pseudo = set(res.pseudo_ids)
        sidecar = {
            **record, "parent": parent,
            "train": {str(i): labels[i] for i in res.train_ids}, "holdout": {str(i): labels[i] for i in res.holdout_ids},
            "decision": {str(i): c for i, c in decision.items()},
            "pseudo_labels": {str(i): c for i, _, c in pseudo if i in trained_pseudo},
        }
        st.model_record_path(version).write_text(json.dumps(sidecar, indent=1))
        with st.write_lock():
            st.versions[version] = {
                **new.describe(), "weights": st.model_weights_entry(version), "created": now_iso("microseconds"),
                "parent": parent, "status": "embedding",
                "finetune": {
                    **{k: record[k] for k in ("method", "best_epoch", "epochs_run", "seconds", "n_train", "n_holdout",
                                              "n_decision", "wise_alpha", "n_pseudo")},
                    "trained_ids": sorted(res.train_ids), "selection_ids": sorted(res.holdout_ids),
                    "pseudo_ids": sorted(res.pseudo_ids),
                    "decision_ids": sorted(decision),
                },
            }
            st.write_manifest()
        return version, record

    def _complete_version(self, version: str, progress: bool, batch_size, workers, evaluate: bool,
                          cfg: FinetuneConfig) -> FinetuneResult:
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
        seen = {**side["train"], **side["holdout"]}  # the labels the new backbone trained or selected on
        decision = side.get("decision") or side["holdout"]  # (records older than the decision fold)
        cmp = self._compare(parent, version, seen, decision, cfg) if len(decision) >= cfg.min_decide else None
        forget = self._forgetting(parent, version, cfg.seed)
        activate, why = decide(cmp, forget, cfg.max_forgetting, len(decision), cfg.min_decide)
        warnings = [w for w in (forgetting_warning(forget),) if w]
        activated = self._decide(version, parent, cmp, forget, activate, why)
        eval_run = self.classify.evaluate(episodes=5) if evaluate and activated else None
        holdout = None if cmp is None else {"parent": cmp["old"], "new": cmp["new"]}
        return FinetuneResult(
            status="activated" if activated else "kept", version=version, parent=parent, active=st.active_version,
            method=side.get("method", ""), message=_verdict(version, activated, why), activated=activated,
            train={k: v for k, v in side.items() if k not in ("train", "holdout", "decision")}, reembedded=len(pending),
            errors=res.errors, vectors=st.count(vectors_table_name(version)), images=st.count("images"),
            embed_seconds=round(res.embed_seconds, 2), index=index, holdout=holdout,
            eval=None if eval_run is None else {"best_head": eval_run.best_head, "best_accuracy": eval_run.best_accuracy},
            decision={**(cmp or {}), "activate": activate, "reason": why, "n": len(decision),
                      "min_decide": cfg.min_decide, "max_forgetting": cfg.max_forgetting, "compared": _COMPARED},
            forgetting=forget, warnings=warnings,
        )

    def _decide(self, version: str, parent: str, cmp: dict | None, forget: dict | None, activate: bool, why: str) -> bool:
        """Record the decision in the manifest; activate `version` when `activate` and its parent is still active."""
        st = self.storage
        with st.write_lock():
            e = st.versions[version]
            e["status"] = "ready"
            e["holdout"] = None if cmp is None else {
                "accuracy": cmp["new"]["accuracy"], "parent_accuracy": cmp["old"]["accuracy"], "head": cmp["new"]["head"],
                "n": cmp["n"], "estimate": cmp["estimate"], "low": cmp["low"], "high": cmp["high"], "margin": cmp["margin"],
            }
            e["decision"] = {"activate": activate, "reason": why, "forgetting": forget}
            activated = activate and st.active_version == parent
            if activated:
                st.manifest["active_version"] = version
            st.write_manifest()
        return activated

    def _compare(self, parent: str, version: str, seen: dict, decision: dict, cfg: FinetuneConfig) -> dict:
        """The paired comparison on the decision labels (loop/decide.py): heads fit on the labels the new
        backbone saw, with each version's vectors, scored on the decision labels it never saw."""
        ids = sorted(int(i) for i in {**seen, **decision})
        correct = {}
        for v in (parent, version):
            vs = self.storage.vectors(v, ids=ids)
            pos = {int(i): k for k, i in enumerate(vs.ids)}
            fit = [i for i in map(int, seen) if i in pos]
            dec = [i for i in map(int, decision) if i in pos]
            if not fit or len(dec) < len(decision):
                raise EmptyInputError(f"version {v} lacks vectors for the fine-tune's labeled images; run finetune again")
            trained = self.classify.trained_ids(v)  # auto never scores on what that version's backbone trained on
            correct[v] = head_correctness(vs.vectors[[pos[i] for i in fit]], [seen[str(i)] for i in fit],
                                          vs.vectors[[pos[i] for i in dec]], [decision[str(i)] for i in dec],
                                          score_mask=~np.isin(fit, trained) if len(trained) else None)
        return paired_comparison(correct[parent], correct[version], cfg.decide_margin, cfg.seed)

    def _forgetting(self, parent: str, version: str, seed: int) -> dict | None:
        """Near-duplicate recall on a sample of the store's unlabeled images, old vs new (loop/forgetting.py)."""
        st = self.storage
        old_v, new_v = st.vectors(parent), st.vectors(version)
        if not np.array_equal(old_v.ids, new_v.ids):
            common = np.intersect1d(old_v.ids, new_v.ids)
            old_v, new_v = st.vectors(parent, ids=common), st.vectors(version, ids=common)
        name = st.version_info(parent)["name"]
        old_bb = self.backbone_for(parent) if parent == st.active_version else None
        old_bb = old_bb or load_backbone(name, st.weights_file(parent), device=self.device())
        new_bb = load_backbone(name, st.weights_file(version), device=self.device())
        labeled = set(self.classify.labels.labels())
        return near_duplicate_recall(old_bb, new_bb, old_v.ids, list(old_v.paths), old_v.vectors, new_v.vectors,
                                     labeled, seed=seed)

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


_COMPARED = ("best-head accuracy (centroid, knn, linear, propagate; heads fit on the labels the new backbone "
             "trained or selected on) of the new vs the parent version on decision labels neither saw in training, "
             "paired bootstrap over those images; and auto (classify's default, fit as classify fits it) must not "
             "be worse there")


def _verdict(version: str, activated: bool, why: str) -> str:
    if activated:
        return f"new version {version} is active: {why}"
    return f"version {version} kept but NOT active: {why}; switch anyway with `embedstore use STORE {version}`"
