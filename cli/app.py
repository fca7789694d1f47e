"""The `embedstore` Typer app. Each module registers its commands; none holds logic of its own."""

from __future__ import annotations

import typer

from . import core

app = typer.Typer(
    name="embedstore",
    help="Turn an image collection into a searchable, labelable embedding index.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

core.register(app)
for _mod in ("search_cmds", "label_cmds", "loop_cmds", "check_cmds", "ui_cmd"):
    try:
        __import__(f"{__package__}.{_mod}", fromlist=["register"]).register(app)
    except ModuleNotFoundError as e:  # a stage not built yet
        if e.name != f"{__package__}.{_mod}":
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
