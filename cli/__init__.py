"""The `embedstore` command (Typer). Thin: argument handling only; the work is in the embedstore API."""
