"""ui: start the Streamlit app on a store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import typer

from embedstore.errors import InvalidArgumentError, NotSupportedError

from .common import STORE_ARG, handle_errors, open_store, out


def streamlit_command(store_root: Path, host: str, port: int) -> list[str]:
    from embedstore.ui import APP_PATH

    return [
        sys.executable, "-m", "streamlit", "run", str(APP_PATH),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--", str(store_root),
    ]


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
            s.listen()
        except OSError as e:
            raise InvalidArgumentError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host")


@handle_errors
def ui(
    store: Path = STORE_ARG,
    port: int = typer.Option(8501, "--port", "-p", min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default serves this machine only (0.0.0.0: every interface)."),
):
    """Open the web UI on STORE: search, label, review predictions, embedding map (Ctrl-C stops it)."""
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise NotSupportedError("the UI needs streamlit and plotly; install them: pip install 'embedstore[ui]'")
    s = open_store(store)  # a missing store fails here, with the usual one-line error
    _check_port(host, port)
    shown = "localhost" if host in ("127.0.0.1", "localhost", "::1") else host
    out.print(f"embedstore UI for {s.root} at [bold]http://{shown}:{port}[/] (Ctrl-C to stop)", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    env = {**os.environ, "EMBEDSTORE_STORE": str(s.root)}
    proc = subprocess.Popen(streamlit_command(s.root, host, port), env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        code = 0
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(ui)
