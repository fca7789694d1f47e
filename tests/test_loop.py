"""The loop's rules and commands that need no training: the plateau rule on synthetic eval histories,
--if-plateau doing nothing without a plateau, version bookkeeping errors, CLI help."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from embedstore.cli.app import app
from embedstore.errors import EmptyInputError, InvalidArgumentError
from embedstore.loop.plateau import PLATEAU_MARGIN, PLATEAU_WINDOW, plateau_rule
from embedstore.results import EvalRun, PlateauResult, VersionRow


def runs(*pairs):
    """Eval runs, oldest first, as eval_history() returns them: (n_labels, best_accuracy) pairs."""
    return [
        EvalRun.from_dict({"n_labels": n, "best_accuracy": a, "time": f"2024-01-01T00:00:{i:02d}"})
        for i, (n, a) in enumerate(pairs)
    ]


def test_defaults_are_documented_values():
    assert (PLATEAU_MARGIN, PLATEAU_WINDOW) == (0.01, 2)


@pytest.mark.parametrize(
    "history, plateau, gain",
    [
        (runs((10, 0.60), (20, 0.70), (30, 0.80)), False, 0.20),  # still climbing
        (runs((10, 0.60), (20, 0.80), (30, 0.805), (40, 0.809)), True, 0.009),  # flat over the last 2 additions
        (runs((10, 0.80), (20, 0.79), (30, 0.78)), True, -0.02),  # getting worse is a plateau too
        (runs((10, 0.80), (20, 0.80), (30, 0.81)), False, 0.01),  # exactly the margin: still progress
    ],
)
def test_plateau_rule(history, plateau, gain):
    r = plateau_rule(history)
    assert isinstance(r, PlateauResult)
    assert r.plateau is plateau
    assert r.gain == pytest.approx(gain, abs=1e-6)
    assert ("gained only" in r.reason) is plateau


def test_too_few_label_counts_is_no_plateau():
    r = plateau_rule(runs((10, 0.8), (20, 0.8)))
    assert r.plateau is False and r.gain is None
    assert "needs 3" in r.reason and "embedstore eval" in r.reason
    assert plateau_rule([]).plateau is False


def test_reruns_at_same_label_count_keep_the_latest():
    # three evals at 30 labels count once, with the latest accuracy
    r = plateau_rule(runs((10, 0.5), (20, 0.7), (30, 0.95), (30, 0.71), (30, 0.705)))
    assert [p["n_labels"] for p in r.points] == [10, 20, 30]
    assert r.gain == pytest.approx(0.205)
    assert r.plateau is False


def test_removed_labels_restart_the_curve():
    r = plateau_rule(runs((10, 0.5), (20, 0.5), (30, 0.5), (15, 0.6), (25, 0.6)))
    assert [p["n_labels"] for p in r.points] == [15, 25]
    assert r.plateau is False  # only 2 points since the restart


def test_margin_and_window_are_configurable():
    h = runs((10, 0.60), (20, 0.70), (30, 0.72), (40, 0.73))
    assert plateau_rule(h, margin=0.01, window=2).plateau is False  # +0.03 over 2 additions
    assert plateau_rule(h, margin=0.05, window=2).plateau is True
    assert plateau_rule(h, margin=0.02, window=1).plateau is True  # +0.01 over the last addition
    assert plateau_rule(h, margin=0.01, window=3).gain == pytest.approx(0.13)
    with pytest.raises(InvalidArgumentError):
        plateau_rule(h, window=0)


def test_runs_without_accuracy_are_ignored():
    h = runs((10, 0.6), (20, 0.7), (30, 0.705)) + [EvalRun.from_dict({"n_labels": 40, "best_accuracy": None})]
    assert len(plateau_rule(h).points) == 3


# ---- on a real store (no training) --------------------------------------------------------------
def test_if_plateau_without_plateau_does_nothing(digits_store):
    s = digits_store
    before = json.loads((s.root / "manifest.json").read_text())
    r = s.finetune(if_plateau=True, progress=False)
    assert r.status == "skipped" and r.version is None
    assert "no plateau" in r.message and "label count" in r.message
    assert json.loads((s.root / "manifest.json").read_text()) == before
    assert not (s.root / "models").exists() or not any((s.root / "models").iterdir())


def test_if_plateau_cli_says_why(digits_store):
    res = CliRunner().invoke(app, ["finetune", str(digits_store.root), "--if-plateau", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["status"] == "skipped" and d["plateau"]["plateau"] is False


def test_version_errors(digits_store):
    s = digits_store
    with pytest.raises(InvalidArgumentError, match="unknown version 'nope'"):
        s.use("nope")
    with pytest.raises(InvalidArgumentError, match="is active"):
        s.prune(s.active_version)
    with pytest.raises(InvalidArgumentError, match="unknown fine-tune method"):
        s.finetune(method="dora", progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown fine-tune option"):
        s.finetune(progress=False, learning_rate=1)
    with pytest.raises(EmptyInputError, match="no labeled images"):
        s.finetune(progress=False)
    res = CliRunner().invoke(app, ["use", str(s.root), "nope"])
    assert res.exit_code == 2 and "unknown version" in res.output and "Traceback" not in res.output


def test_versions_of_a_new_store(digits_store):
    rows = digits_store.versions()
    assert len(rows) == 1
    r = rows[0]
    assert r.active and r.parent is None and r.status == "ready"
    assert r.vectors == digits_store.count_images()
    assert isinstance(r, VersionRow) and set(r.to_dict()) >= {"version", "active", "created", "parent", "eval_accuracy"}
    assert digits_store.info().finetuned_versions == 0


@pytest.mark.parametrize("cmd", ["finetune", "versions", "use", "prune"])
def test_commands_have_help(cmd):
    res = CliRunner().invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and len(res.output) > 100
