"""Request guards in front of every route: host header, token, cross-site requests, body and query size.

Written as one plain ASGI middleware so the checks run before routing and before a body is read. Also the
gate that lets one model job run at a time with a bounded queue behind it.
"""

from __future__ import annotations

import asyncio
import hmac
import html as html_mod
import json
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from .config import ServerConfig

TOKEN_COOKIE = "thoughtscope_token"


def _plain(status: int, message: str, html: bool):
    """The refusal as a small page (the message escaped: it quotes headers the client chose) or as JSON."""
    body = (
        f"<!doctype html><meta charset=utf-8><title>{status}</title><body style='font-family:sans-serif;"
        f"margin:3em'><h1>{status}</h1><p>{html_mod.escape(message)}</p>"
        if html
        else json.dumps({"error": message, "status": status})
    )
    ctype = b"text/html; charset=utf-8" if html else b"application/json"
    return status, [(b"content-type", ctype), (b"cache-control", b"no-store")], body.encode()


def _styled(scope, cfg: ServerConfig, status: int, message: str):
    """The refusal as the workbench's own error page (its style sheet, the limit it hit, a way back), rendered
    without the workbench's state: nothing about the model is shown to a request that was refused."""
    env = getattr(getattr(scope.get("app"), "state", None), "env", None)
    if env is None:  # the Guard in front of another app: the small page
        return _plain(status, message, True)
    body = env.get_template("error.html").render(wb=None, cfg=cfg, nav="", status=None, code=status, message=message)
    headers = [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"no-store")]
    return status, headers, body.encode()


class Guard:
    """ASGI middleware: reject before the app sees the request; never adds CORS headers."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.cfg = config
        self.hosts = config.allowed_hosts()
        self.check_host = not (config.public and config.host in ("0.0.0.0", "::"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        html = "text/html" in headers.get("accept", "")
        query = scope.get("query_string", b"").decode("latin-1")
        refused = self._refuse(headers, query)
        if refused is not None:
            return await _send(send, *(_styled(scope, self.cfg, *refused) if html else _plain(*refused, html)))
        if self.cfg.token and "token=" in query and scope["method"] == "GET":
            # a ?token= link: keep the token in a cookie and drop it from the address bar
            rest = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"])
            loc = scope["path"] + (f"?{rest}" if rest else "")
            cookie = f"{TOKEN_COOKIE}={self.cfg.token}; Path=/; HttpOnly; SameSite=Strict"
            return await send_redirect(send, loc, cookie)
        return await self.app(scope, _capped(receive, self.cfg.max_body_bytes), send)

    def _refuse(self, headers: dict, query: str) -> tuple[int, str] | None:
        """(status, message) of a request refused before the app sees it, or None."""
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.check_host and name not in self.hosts:
            return (
                400,
                f"host header {host!r} is not allowed: open the workbench at http://127.0.0.1:"
                f"{self.cfg.port}/ (a foreign host name is how DNS-rebinding attacks reach local "
                f"servers)",
            )
        if self.cfg.token and not self._has_token(headers, query):
            return (
                401,
                "this workbench needs its token: open the link with ?token=... that "
                "`thoughtscope serve` printed, or send 'Authorization: Bearer TOKEN'",
            )
        site, mode = headers.get("sec-fetch-site"), headers.get("sec-fetch-mode")
        origin = headers.get("origin")
        if site == "cross-site" and mode != "navigate":
            return (403, "cross-site requests are refused (no CORS): use the workbench's own pages")
        if origin and origin != "null" and origin.split("://", 1)[-1] != host:
            return (403, f"requests from origin {origin!r} are refused (no CORS)")
        if len(query) > self.cfg.max_query_chars:
            return (
                414,
                f"query string of {len(query)} characters is over the limit of "
                f"{self.cfg.max_query_chars}: send long texts with POST",
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return (400, f"bad content-length header {length!r}")
            if int(length) > self.cfg.max_body_bytes:
                return (
                    413,
                    f"request body of {int(length):,} bytes is over the limit of {self.cfg.max_body_bytes:,} bytes",
                )
        return None

    def _has_token(self, headers: dict, query: str) -> bool:
        want = self.cfg.token.encode()
        cands = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            cands.append(auth[7:].strip())
        if "cookie" in headers:
            c = SimpleCookie()
            try:
                c.load(headers["cookie"])
            except Exception:  # noqa: BLE001 - a malformed cookie header just carries no token
                c = {}
            if TOKEN_COOKIE in c:
                cands.append(c[TOKEN_COOKIE].value)
        cands += [v for k, v in parse_qsl(query) if k == "token"]
        return any(hmac.compare_digest(c.encode(), want) for c in cands)


class BodyTooLarge(Exception):
    pass


def _capped(receive, limit: int):
    """A receive() that counts body bytes (chunked uploads carry no content-length) and stops past the limit."""
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit:,} bytes")
        return msg

    return wrapped


async def _send(send, status: int, headers: list, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers + [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_redirect(send, location: str, cookie: str) -> None:
    await _send(send, 303, [(b"location", location.encode()), (b"set-cookie", cookie.encode())], b"")


class Busy(Exception):
    """The model is busy and the queue behind it is full."""


class Ticket:
    """A job's place at the gate: taken before the response starts, given back exactly once."""

    def __init__(self, gate: Gate):
        self.gate, self.held = gate, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.admitted -= 1


class Gate:
    """One model job at a time; at most `queue_size` waiting behind it; more than that answers 429 at once.

    Admission (`ticket`) is synchronous: the count and the check happen with no await between them, so a burst
    of requests arriving together cannot all pass the check before any of them is counted, and a streaming
    route can take its ticket before it answers 200 (the over-limit requests get a 429, not an error event).
    """

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.admitted = 0  # jobs holding a ticket: the running one and those waiting behind it
        self.running = False
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        return self.admitted - int(self.running)

    def full(self) -> bool:
        return self.admitted > self.queue_size

    def ticket(self) -> Ticket:
        """A place in the queue now, or Busy."""
        if self.full():
            raise Busy(f"the model is busy and {self.waiting} requests are already waiting; try again shortly")
        self.admitted += 1
        return Ticket(self)

    @asynccontextmanager
    async def slot(self, ticket: Ticket | None = None):
        """Run one job: wait for the model with `ticket` (taken here when not given), give the ticket back after."""
        ticket = ticket or self.ticket()
        try:
            await self._lock.acquire()
            self.running = True
            try:
                yield
            finally:
                self.running = False
                self._lock.release()
        finally:
            ticket.release()
