"""ui: start the Streamlit app on a store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import typer

from embedstore.errors import InvalidArgumentError, NotSupportedError

from .common import STORE_ARG, handle_errors, open_store, out


STOP_WAIT_S = 10.0  # after a stop signal, how long the Streamlit child may take to exit before it is killed


def streamlit_command(store_root: Path, host: str, port: int) -> list[str]:
    from embedstore.ui import SERVER_PATH

    return [
        sys.executable, "-m", "streamlit", "run", str(SERVER_PATH),
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


class _Stop(Exception):
    """A stop signal (SIGTERM, SIGHUP) arrived while serving."""


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _serve(cmd: list[str], env: dict) -> int:
    """Run the Streamlit child until it exits or this process is told to stop (Ctrl-C, SIGTERM, SIGHUP: e.g.
    `kill PID`, systemd, a closed terminal); then stop the child too (SIGTERM, SIGKILL after STOP_WAIT_S)."""
    stops = (signal.SIGTERM, signal.SIGHUP)
    proc = subprocess.Popen(cmd, env=env)
    previous = {s: signal.signal(s, _raise_stop) for s in stops}
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stop):
        for s in (*stops, signal.SIGINT):  # a second signal must not cut the shutdown short
            signal.signal(s, signal.SIG_IGN)
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@handle_errors
def ui(
    store: Path = STORE_ARG,
    port: int = typer.Option(8501, "--port", "-p", min=1, max=65535, help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default serves this machine only (0.0.0.0: every interface)."),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", metavar="NAME",
        help="Also accept requests naming this host (a DNS name or a proxy's); repeat for more; '*' accepts any. "
             "Other Host headers are refused (DNS rebinding)."),
):
    """Open the web UI on STORE: search, label, review predictions, embedding map (Ctrl-C or SIGTERM stops it)."""
    try:
        import streamlit
    except ImportError:
        raise NotSupportedError("the UI needs streamlit and plotly; install them: pip install 'embedstore[ui]'")
    if not hasattr(streamlit, "App"):  # ui/server.py serves the app as st.App behind the Host check
        raise NotSupportedError(f"the UI needs a streamlit with st.App (this one is {streamlit.__version__}); "
                                "upgrade it: pip install -U streamlit")
    s = open_store(store)  # a missing store fails here, with the usual one-line error
    _check_port(host, port)
    shown = "localhost" if host in ("127.0.0.1", "localhost", "::1") else host
    out.print(f"embedstore UI for {s.root} at [bold]http://{shown}:{port}[/] (Ctrl-C to stop)", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    env = {**os.environ, "EMBEDSTORE_STORE": str(s.root), "EMBEDSTORE_UI_ALLOW_HOSTS": ",".join(allow_host)}
    raise typer.Exit(_serve(streamlit_command(s.root, host, port), env))


def register(app: typer.Typer) -> None:
    app.command()(ui)
