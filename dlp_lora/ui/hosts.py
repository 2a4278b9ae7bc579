"""Only requests addressed to this app are served: the ``Host`` (and ``Origin``) header is checked.

Binding to 127.0.0.1 keeps other machines out, but not a web page on another site: through DNS rebinding its
name (``evil.example``) resolves to 127.0.0.1, and the browser then sends the page's requests to this app with
``Host: evil.example``; a plain cross-site form post arrives with a foreign ``Origin``. Either could start
training or overwrite files. So by default a request is served only when its Host names the bound address (or
loopback, when bound to loopback), and its Origin, when sent, names one of the same hosts. ``--allow-host``
adds names (a reverse proxy, a machine name). An IP-literal Host can never be a rebinding, so a server bound
to every interface (0.0.0.0) accepts any IP literal, its own machine names and loopback.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def normalise_host(value: str) -> str:
    """``Host`` header value or bare name -> lowercase name without port, brackets or trailing dot."""
    v = (value or "").strip().lower()
    if v.startswith("["):                        # [::1]:7860
        return v[1:v.index("]")] if "]" in v else v
    if v.count(":") == 1:                        # name:port (a bare IPv6 address has several colons)
        v = v.split(":", 1)[0]
    return v.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    return name == "localhost" or (_is_ip(name) and ipaddress.ip_address(name).is_loopback)


def _machine_names() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    return {normalise_host(n) for n in names if n}


class AllowedHosts:
    """The names a request may address, decided once from the bound address and ``--allow-host``."""

    def __init__(self, bind_host: str, extra: Iterable[str] = ()) -> None:
        bind = normalise_host(bind_host) if bind_host not in WILDCARD else ""
        self.any_ip = bind == ""
        names = {normalise_host(h) for h in extra if h and h.strip()}
        names.update(LOOPBACK_NAMES)
        if self.any_ip:
            names.update(_machine_names())
        else:
            names.add(bind)
            if not _is_loopback(bind):
                names.update(_machine_names())
        self.names = frozenset(names)

    def allows(self, host: str) -> bool:
        name = normalise_host(host)
        if name in self.names:
            return True
        return self.any_ip and _is_ip(name)


def refusal(headers: dict[str, str], allowed: AllowedHosts) -> str | None:
    """Why a request with these (lowercase-named) headers is refused, or None to serve it."""
    host = headers.get("host", "")
    if not host or not allowed.allows(host):
        return f"host {host!r} is not allowed (start the app with --allow-host {normalise_host(host) or 'NAME'})"
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not allowed.allows(parts.netloc):
            return f"origin {origin!r} is not allowed"
    return None


class HostGuard:
    """ASGI middleware: answers 403 (HTTP) or closes (websocket) when :func:`refusal` says so."""

    def __init__(self, app, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            why = refusal(headers, self.allowed)
            if why is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"error": {"message": why, "type": "forbidden"}}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def guard_middleware(bind_host: str, extra: Iterable[str] = ()) -> list:
    """The middleware list for the FastAPI app Gradio builds (``launch(app_kwargs={"middleware": ...})``)."""
    from starlette.middleware import Middleware

    return [Middleware(HostGuard, allowed=AllowedHosts(bind_host, extra))]
