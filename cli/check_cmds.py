"""check: verify a whole store, and repair what is safe."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import JSON_OPT, STORE_ARG, emit_json, handle_errors, out

STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@handle_errors
def check(
    store: Path = STORE_ARG,
    repair: bool = typer.Option(
        False, "--repair", help="Fix what is safe: rebuild a damaged index, drop orphan rows, delete temp files, "
        "keep one vector per image, raise next_id, restore a damaged manifest from its backup. Never deletes images "
        "or labels of images in the store.",
    ),
    json_: bool = JSON_OPT,
):
    """Verify STORE (manifest, tables, vectors, labels, index checksums, weights, temp files); exit 1 if problems remain."""
    import embedstore

    res = embedstore.Store.check_path(store, repair=repair)  # works when the manifest cannot be read
    if json_:
        emit_json(res.to_dict())
    else:
        for f in res.findings:
            mark = " [green](repaired)[/]" if f.repaired else ""
            out.print(f"[{STYLE.get(f.severity, '')}]{f.severity}[/] {f.code}{mark}: {f.message}", highlight=False,
                      soft_wrap=True)
            if f.fix:
                hint = "  (run with --repair)" if f.repairable and not repair else ""
                out.print(f"    {'done' if f.repaired else 'fix'}: {f.fix}{hint}", highlight=False, soft_wrap=True)
        out.print(_summary(res, store), highlight=False, soft_wrap=True)
    if not res.ok:
        raise typer.Exit(1)


def _summary(res, store: Path) -> str:
    left = res.problems
    head = f"checked {', '.join(res.checked)} in {res.seconds:.1f}s"
    done = f"; repaired {res.repaired}" if res.repaired else ""
    if not left:
        return f"{head}{done}: store is OK"
    fixable = sum(f.repairable for f in left)
    hint = f"; `embedstore check {store} --repair` fixes {fixable} of them" if fixable and not res.repair else ""
    return f"{head}{done}: {len(left)} problem(s) left{hint}"


def register(app: typer.Typer) -> None:
    app.command()(check)
