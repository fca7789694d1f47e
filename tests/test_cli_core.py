"""CLI core commands: --json shapes of add/info/backbones, one-line errors with exit code 2, help texts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from embedstore.cli.app import app

ADD_KEYS = {"added", "skipped_duplicates", "errors", "seconds", "images_per_second"}
INFO_KEYS = {"images", "vectors", "backbone", "version", "dim", "errors"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)  # handled, not an uncaught exception
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    assert res.stdout == ""  # nothing on stdout, even with --json
    return err


@pytest.fixture()
def few_photos(photo_dir, tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for p in sorted(photo_dir.rglob("*.jpg"))[::20]:  # 4 images
        shutil.copy(p, d / p.name)
    return d


# ---- --json shapes ----------------------------------------------------------------------------
def test_add_then_info_json(few_photos, tmp_path):
    store = tmp_path / "cli.es"
    res = invoke("add", store, few_photos, "--json", "--batch-size", "2", "--workers", "0")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert ADD_KEYS <= set(d)
    assert (d["added"], d["skipped_duplicates"], d["errors"]) == (4, 0, 0)
    assert d["seconds"] > 0 and d["images_per_second"] > 0 and d["batch_size"] == 2
    assert isinstance(d["error_list"], list) and d["device"] == "cpu"

    res = invoke("add", store, few_photos, "--json")  # again: all duplicates
    d2 = json.loads(res.stdout)
    assert (d2["added"], d2["skipped_duplicates"]) == (0, 4)

    res = invoke("info", store, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert INFO_KEYS <= set(info)
    assert (info["images"], info["vectors"], info["errors"]) == (4, 4, 0)
    assert info["backbone"] == "offline:efficientnet_lite0" and info["dim"] == 1280
    assert isinstance(info["version"], str) and len(info["version"]) == 12

    human = invoke("info", store)
    assert human.exit_code == 0 and "efficientnet_lite0" in human.stdout


def test_add_with_bad_files_exits_zero_and_reports_them(few_photos, tmp_path):
    (few_photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (few_photos / "text.png").write_text("hello")
    store = tmp_path / "bad.es"
    res = invoke("add", store, few_photos, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["added"] == 4 and d["errors"] == 2
    assert sorted(Path(e["path"]).name for e in d["error_list"]) == ["broken.jpg", "text.png"]
    info = json.loads(invoke("info", store, "--json").stdout)
    assert info["errors"] == 2 and len(info["error_list"]) == 2

    # human output names the skipped files
    (few_photos / "more.gif").write_bytes(b"GIF89a garbage")
    res = invoke("add", store, few_photos)
    assert res.exit_code == 0 and "more.gif" in res.stdout and "skipped" in res.stdout


def test_backbones_json():
    res = invoke("backbones", "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert all(set(r) == {"name", "description", "default"} for r in rows)
    assert [r["name"] for r in rows if r["default"]] == ["offline:efficientnet_lite0"]
    assert any(r["name"].startswith("openclip:") for r in rows) and any(r["name"].startswith("timm:") for r in rows)
    human = invoke("backbones")
    assert human.exit_code == 0 and "offline:efficientnet_lite0" in human.stdout and "--weights" in human.stdout


# ---- one-line errors, exit code 2 -------------------------------------------------------------
def test_missing_store(tmp_path):
    assert_one_line_error(invoke("info", tmp_path / "nope.es", "--json"), "no store at", "embedstore add")


def test_unknown_backbone_lists_valid_prefixes(few_photos, tmp_path):
    err = assert_one_line_error(
        invoke("add", tmp_path / "x.es", few_photos, "--backbone", "resnet50", "--json"), "unknown backbone 'resnet50'"
    )
    assert "openclip:ARCH/PRETRAINED" in err and "timm:MODEL[.TAG]" in err and "offline:efficientnet_lite0" in err
    assert not (tmp_path / "x.es").exists()  # a bad name touches nothing on disk


def test_backbone_mismatch(photo_store_path, few_photos):
    assert_one_line_error(
        invoke("add", photo_store_path, few_photos, "--backbone", "timm:resnet18", "--json"),
        "holds vectors of offline:efficientnet_lite0",
        "Omit --backbone/--weights",
    )


def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert_one_line_error(invoke("add", tmp_path / "e.es", tmp_path / "empty"), "no image files found")


def test_all_files_bad(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope")
    assert_one_line_error(invoke("add", tmp_path / "b.es", tmp_path / "bad", "--json"), "none of the 1 file(s) could be read as images")


def test_missing_weights_file(few_photos, tmp_path):
    assert_one_line_error(
        invoke("add", tmp_path / "w.es", few_photos, "--backbone", "timm:efficientnet_lite0", "--weights",
               tmp_path / "missing.pth"),
        "weights file not found",
    )


def test_real_console_script_prints_no_traceback(tmp_path):
    """The installed `embedstore` entry point, in its own process: one line on stderr, exit code 2."""
    exe = Path(sys.executable).with_name("embedstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "embedstore.cli.app"]
    r = subprocess.run([*cmd, "info", str(tmp_path / "missing.es")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no store at"), r.stderr


# ---- help -------------------------------------------------------------------------------------
def registered_commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    return dict(group.commands)


def test_core_commands_are_registered():
    assert {"add", "info", "backbones", "demo"} <= set(registered_commands())


@pytest.mark.parametrize("name", sorted(registered_commands()))
def test_every_command_has_help(name):
    cmd = registered_commands()[name]
    assert cmd.help and cmd.help.strip(), f"command {name} has no help text"
    res = invoke(name, "--help")
    assert res.exit_code == 0 and "Usage" in res.stdout
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name != "help":
            assert p.help, f"option {p.opts} of {name} has no help text"


def test_top_level_help_lists_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for name in ("add", "info", "backbones", "demo"):
        assert name in res.stdout
