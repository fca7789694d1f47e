"""The shape the README's Architecture section promises: services never import the facade, cli/ and ui/
use only the facade (and its results, errors, the backbone listing), every public Store method returns
a typed result whose to_dict() is JSON."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "embedstore").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_but_the_package_init_imports_the_facade(path):
    if path.name == "__init__.py" and path.parent.name == "embedstore":
        return
    assert not {m for m in imports(path) if m == "embedstore.store" or m.startswith("embedstore.store.")}, path


ALLOWED_FOR_SHELLS = ("embedstore.errors", "embedstore.results", "embedstore.ingest.backbones", "embedstore.demo",
                      "embedstore.ui", "embedstore.cli")


@pytest.mark.parametrize("path", sorted([*(ROOT / "cli").glob("*.py"), *(ROOT / "ui").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_cli_and_ui_use_only_the_facade(path):
    inner = {m for m in imports(path) if m.startswith("embedstore.")}
    bad = {m for m in inner if not m.startswith(ALLOWED_FOR_SHELLS)}
    assert not bad, f"{path.name} reaches past the facade: {sorted(bad)}"
    assert ".storage" not in path.read_text(), f"{path.name} uses the storage core"


def test_results_are_json(photo_store):
    """Every result a read-only call returns serialises with to_dict() (what --json prints)."""
    hits = photo_store.search(id=0, k=3)
    objs = [photo_store.info(), *hits, *photo_store.versions(), *photo_store.duplicates(threshold=0.99)]
    for o in objs:
        json.dumps(o.to_dict())
    assert {"id", "path", "score", "label", "prediction"} == set(hits[0].to_dict())
