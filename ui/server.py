"""What `embedstore ui` serves: the Streamlit app (app.py) as an ASGI app (`st.App`) behind a Host check.

DNS rebinding: a web page on evil.example can make its own name resolve to 127.0.0.1, and the browser then
treats this server as evil.example's, so that page could drive the UI (label writes included). Every
HTTP request and WebSocket handshake whose Host header is not a name of the address the UI was bound to
(at the port it listens on) is refused with 403 before Streamlit sees it.

Allowed names: localhost, 127.0.0.1 and ::1; the bound address (server.address) unless it is a wildcard;
for a wildcard (0.0.0.0, ::) also this machine's host name, FQDN and their addresses, and the address of
the interface that carries its outbound traffic; and whatever EMBEDSTORE_UI_ALLOW_HOSTS lists (comma-
separated; `embedstore ui --allow-host NAME`), where "*" turns the check off (a proxy that rewrites Host).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import streamlit as st
from starlette.middleware import Middleware

APP_PATH = Path(__file__).with_name("app.py")  # not `from embedstore.ui import`: that imports the library (torch)

ALLOW_ENV = "EMBEDSTORE_UI_ALLOW_HOSTS"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def _norm(name: str) -> str:
    return name.strip().strip("[]").lower().rstrip(".")


def _machine_names() -> set[str]:
    """Names and addresses a client on the network may use for this machine (best effort, no traffic)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for n in list(names):
        try:
            names.update(ai[4][0] for ai in socket.getaddrinfo(n, None))
        except OSError:
            pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # connecting a UDP socket sends nothing; it only picks the outbound interface
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                names.add(s.getsockname()[0])
        except OSError:
            pass
    return names


def allowed_hosts(bound: str, extra: str = "") -> set[str] | None:
    """The host names (no ports) a request may name for a server bound to `bound`; None: any."""
    more = {_norm(h) for h in extra.split(",") if h.strip()}
    if "*" in more:
        return None
    names = set(LOOPBACK) | more
    if _norm(bound) in WILDCARDS:
        names |= {_norm(n) for n in _machine_names()}
    else:
        names.add(_norm(bound))
    return names


def host_allowed(host: str | None, port: int | None, names: set[str] | None) -> bool:
    """Whether a Host header value names this server: an allowed name and the port it listens on."""
    if names is None:
        return True
    if not host:
        return False
    try:
        parts = urlsplit(f"//{host}")
        hostname, hport = parts.hostname, parts.port
    except ValueError:
        return False
    if not hostname or parts.username or parts.password or parts.path:
        return False
    return _norm(hostname) in names and (port is None or (hport or 80) == port)


class HostCheck:
    """ASGI middleware: refuse (403) HTTP requests and WebSocket handshakes whose Host is not this server's."""

    def __init__(self, app, names: set[str] | None = None):
        self.app = app
        self.names = names
        self.ready = names is not None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if not self.ready:  # config is loaded by the time the first request comes
            self.names = allowed_hosts(str(st.get_option("server.address") or ""), os.environ.get(ALLOW_ENV, ""))
            self.ready = True
        hosts = [v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"host"]
        host = hosts[0] if len(hosts) == 1 else None  # none, or two that may disagree: refused
        port = (scope.get("server") or (None, None))[1]
        if host_allowed(host, port, self.names):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # closing before accepting: the server answers the handshake with 403
            return await send({"type": "websocket.close", "code": 1008})
        body = (f"403: Host {host!r} is not an address of this embedstore UI (DNS rebinding protection); open it "
                "as http://localhost:PORT, or start it with --allow-host NAME\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"x-content-type-options", b"nosniff"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


app = st.App(str(APP_PATH), middleware=[Middleware(HostCheck)])
