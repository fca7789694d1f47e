"""Shared CLI plumbing: one-line errors with exit code 2, JSON output, the store argument."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from embedstore.errors import EmbedstoreError, InvalidArgumentError

console = Console(stderr=True)  # progress and human output go to stderr when --json owns stdout
out = Console()

STORE_ARG = typer.Argument(..., help="Store directory (created by `add` when new).", show_default=False)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object (or list) on stdout; no progress bars.")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fail(msg: str, code: int = 2) -> None:
    # escaped: a message naming 'embedstore[gpu]' or a path with brackets is text, not Rich markup
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; None for no text; InvalidArgumentError naming the option otherwise."""
    if not text:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InvalidArgumentError(f"{what} must be comma-separated integers such as 1,2,4; got {text!r}") from None


def handle_errors(fn: Callable) -> Callable:
    """Library exceptions become one line on stderr and exit code 2; Ctrl-C exits 130. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmbedstoreError as e:
            fail(str(e))
        except KeyboardInterrupt:
            console.print("interrupted; what was committed is kept, run the command again to continue")
            raise typer.Exit(130)

    return wrapper


def open_store(path: Path, create: bool = False, **kw):
    import embedstore

    return embedstore.open(path, create=create, **kw)
