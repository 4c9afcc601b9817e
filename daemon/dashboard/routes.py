"""Every path under /dashboard on the JSON-RPC port (mounted by daemon.api.http).

Access: `dashboard_login` (a JSON-RPC method, so behind the RPC cookie) issues a one-time
code; GET /dashboard/login?code=... trades it for a session cookie and redirects to the
page. Everything else needs that cookie, and a Host header naming the loopback (a page on
another site that rebinds its DNS name to 127.0.0.1 is refused).

Routes (GET or HEAD only; a request body is refused):
  /dashboard/                the page        /dashboard/static/NAME  its files
  /dashboard/api/VIEW        JSON: node, network, models, jobs, money (with the earnings
                             plot's points so far), doctor (on demand),
                             registry?kind=&filter=&limit=&cursor=
  /dashboard/events          server-sent events: `live` every interval, `generations` (this
                             node's recent ones: routes, failovers, speed) every interval
                             it changed, `models` and `nodes` every few, `money` (earnings
                             totals) every 30

The event feed holds no queue: each tick it builds the newest numbers and writes them with a
deadline, so a reader that does not read is dropped after `WRITE_TIMEOUT_S` and never makes
the daemon buffer more than one event. At most `MAX_FEEDS` feeds run at once (503 beyond).
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import trio

from daemon.api.httpio import (
    BodyTooLarge,
    ClientGone,
    Headers,
    Response,
    TimedOut,
    header,
    read_body,
)
from daemon.dashboard import auth, views
from daemon.dashboard.live import Sampler, per_model

log = logging.getLogger(__name__)

MAX_FEEDS = 8
INTERVAL_S = 1.0
SLOW_EVERY = 5  # `models` and `nodes` events every this many intervals
VIEW_TIMEOUT_S = 120.0  # `doctor` dials peers and asks the chain
MONEY_EVERY = 30  # a `money` event (earnings totals, balance: asks the chain)
MONEY_POINTS = 240  # earnings kept for the plot: 2 hours of points, one per MONEY_EVERY
MONEY_TIMEOUT_S = 5.0  # a slow chain delays the feed at most this long
WRITE_TIMEOUT_S = 5.0
FEED_LIFETIME_S = 3600.0  # then the feed ends; EventSource reconnects by itself
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
LOOPBACK_HOSTS = {b"127.0.0.1", b"localhost", b"[::1]"}
SECURITY_HEADERS: Headers = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOGIN_HINT = (
    "not logged in: run `gridmesh dashboard` on this machine (as the node's user) and open "
    "the link it prints; a link works once, for two minutes"
)


def _json(status: int, doc: Any, extra: Headers | None = None) -> Response:
    body = json.dumps(doc, separators=(",", ":"), default=str).encode("utf-8")
    return Response(status, body, b"application/json", SECURITY_HEADERS + (extra or []))


def _error(status: int, message: str, extra: Headers | None = None) -> Response:
    return _json(status, {"error": message}, extra)


def load_static(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, bytes]]:
    """The page's files, read once: name -> (content type, bytes)."""
    files = {}
    for path in sorted(directory.iterdir()):
        kind = STATIC_TYPES.get(path.suffix)
        if kind is not None and path.is_file():
            files[path.name] = (kind, path.read_bytes())
    return files


class Dashboard:
    """The /dashboard routes of one daemon's RPC server."""

    def __init__(
        self,
        dispatcher: Any,
        metrics: Callable[[], bytes],
        on_reject: Callable[[str], None],
        *,
        max_feeds: int = MAX_FEEDS,
        interval_s: float = INTERVAL_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        feed_lifetime_s: float = FEED_LIFETIME_S,
    ) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.on_reject = on_reject
        self.logins = auth.Logins()
        self.static = load_static()
        self.max_feeds = max_feeds
        self.interval_s = interval_s
        self.write_timeout_s = write_timeout_s
        self.feed_lifetime_s = feed_lifetime_s
        self.feeds = 0
        self._ids = 0
        # the earnings plot's points, shared by every page: (trio time taken, point)
        self.money_points: deque[tuple[float, dict[str, Any]]] = deque(maxlen=MONEY_POINTS)

        async def dashboard_login() -> dict[str, Any]:
            """A one-time link (path on this RPC port) that opens the dashboard."""
            code = self.logins.new_code()
            return {"path": f"/dashboard/login?code={code}", "expires_in_s": auth.CODE_TTL_S}

        if dispatcher.handler("dashboard_login") is None:  # one RPC server per dispatcher
            dispatcher.register("dashboard_login", dashboard_login)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A JSON-RPC call on this daemon, in process; RPCFailed on an error answer."""
        self._ids += 1
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": self._ids, "method": method}
        if params is not None:
            req["params"] = params
        raw = await self.dispatcher.handle(json.dumps(req).encode("utf-8"))
        doc = json.loads(raw or b"{}")
        if "error" in doc:
            raise views.RPCFailed(doc["error"].get("code", 0), doc["error"].get("message", ""))
        return doc.get("result")

    async def handle(
        self, conn: h11.Connection, stream: trio.abc.Stream, req: h11.Request, deadline: float
    ) -> Response:
        """Answer one request under /dashboard (an event feed is streamed here, then
        ClientGone ends the connection)."""
        path, _, query = req.target.partition(b"?")
        if req.method not in (b"GET", b"HEAD"):
            return _error(405, "method not allowed", [(b"allow", b"GET, HEAD")])
        try:
            await read_body(conn, stream, req, deadline, 0)
        except BodyTooLarge:
            self._reject("dashboard_body")
            return Response(413, b"no body expected\n", b"text/plain", close=True)
        except TimedOut:
            return Response(408, b"request timeout\n", b"text/plain", close=True)
        host = (header(req.headers, b"host") or b"").rsplit(b":", 1)[0]
        if host.lower() not in LOOPBACK_HOSTS and not host.startswith(b"[::1]"):
            self._reject("dashboard_host")
            return _error(421, "the dashboard answers only at 127.0.0.1 or localhost")
        if path == b"/dashboard/login":
            return self._login(query)
        if not self.logins.valid(auth.session_of(header(req.headers, b"cookie"))):
            self._reject("dashboard_unauthorized")
            if path.startswith(b"/dashboard/api/") or path == b"/dashboard/events":
                return _error(401, LOGIN_HINT)
            return self._page(401, "login.html")
        if path in (b"/dashboard", b"/dashboard/"):
            return self._page(200, "index.html")
        if path.startswith(b"/dashboard/static/"):
            name = path.removeprefix(b"/dashboard/static/").decode("ascii", "replace")
            if name not in self.static:
                return _error(404, "no such file")
            kind, body = self.static[name]
            return Response(200, body, kind, SECURITY_HEADERS)
        if path.startswith(b"/dashboard/api/"):
            return await self._view(path.removeprefix(b"/dashboard/api/"), query)
        if path == b"/dashboard/events":
            if self.feeds >= self.max_feeds:
                self._reject("dashboard_feeds")
                return _error(503, f"{self.max_feeds} live feeds are open already: close one")
            session = auth.session_of(header(req.headers, b"cookie"))
            await self._feed(conn, stream, session, head=req.method == b"HEAD")
            raise ClientGone  # the feed ended: so does its connection
        return _error(404, "not found: the dashboard is at /dashboard/")

    def _page(self, status: int, name: str) -> Response:
        kind, body = self.static[name]
        return Response(status, body, kind, SECURITY_HEADERS)

    def _login(self, query: bytes) -> Response:
        try:
            code = views.parse_query(query, {"code"}).get("code", "")
        except views.ViewError as exc:
            return _error(400, str(exc))
        session = self.logins.redeem(code)
        if session is None:
            self._reject("dashboard_login")
            return self._page(403, "login.html")
        cookie = (b"set-cookie", self.logins.set_cookie(session))
        return Response(303, b"", None, SECURITY_HEADERS + [(b"location", b"/dashboard/"), cookie])

    async def _view(self, name: bytes, query: bytes) -> Response:
        try:
            if name == b"registry":
                return _json(200, await views.registry_view(self.call, views.registry_query(query)))
            if name == b"jobs":
                views.parse_query(query, set())
                return _json(200, await views.jobs_view(self.call, self._per_model()))
            if name == b"money":  # with the plot's points so far: a reload keeps the history
                views.parse_query(query, set())
                with trio.move_on_after(VIEW_TIMEOUT_S):
                    money = await views.money_view(self.call)
                    return _json(200, {**money, "history": [p for _, p in self.money_points]})
                return _error(504, f"the money view took longer than {VIEW_TIMEOUT_S:g} s")
            view = views.VIEWS.get(name.decode("ascii", "replace"))
            if view is None:
                known = ", ".join([*views.VIEWS, "jobs", "registry"])
                return _error(404, f"no view {name[:40].decode('ascii', 'replace')!r}: {known}")
            if query:
                views.parse_query(query, set())  # these views take no parameters
            with trio.move_on_after(VIEW_TIMEOUT_S):
                return _json(200, await view(self.call))
            return _error(504, f"the {name.decode()} view took longer than {VIEW_TIMEOUT_S:g} s")
        except views.ViewError as exc:
            self._reject("dashboard_bad_query")
            return _error(400, str(exc))

    async def _feed(
        self, conn: h11.Connection, stream: trio.abc.Stream, session: str, *, head: bool
    ) -> None:
        self.feeds += 1
        try:
            headers = [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-store"),
                (b"connection", b"close"),
                *SECURITY_HEADERS,
            ]
            await self._write(stream, conn.send(h11.Response(status_code=200, headers=headers)))
            if head:
                return
            sampler = Sampler(self.metrics)
            tick = 0
            sent: Any = []  # the last `generations` sent (none yet: as if none ran)
            with trio.move_on_after(self.feed_lifetime_s):
                await self._write(stream, conn.send(h11.Data(data=b"retry: 2000\n\n")))
                while self.logins.valid(session):
                    await self._event(conn, stream, "live", sampler.next())
                    recent = await views.generations(self.call)
                    if recent != sent:
                        await self._event(conn, stream, "generations", recent)
                        sent = recent
                    if tick % SLOW_EVERY == 0:
                        models = await views.models_view(self.call, with_routes=False)
                        await self._event(conn, stream, "models", models)
                        await self._event(conn, stream, "nodes", await self._nodes())
                    if tick % MONEY_EVERY == 0:
                        await self._event(conn, stream, "money", await self._money())
                    tick += 1
                    await trio.sleep(self.interval_s)
        except trio.TooSlowError:
            self._reject("dashboard_slow_reader")
        finally:
            self.feeds -= 1

    def _per_model(self) -> list[dict[str, Any]]:
        try:
            return per_model(self.metrics().decode("utf-8", "replace"))
        except Exception:  # a broken collector must not break the view
            log.exception("dashboard: reading metrics failed")
            return []

    async def _money(self) -> dict[str, Any]:
        """The newest point of the earnings plot: one taken less than half a money interval
        ago (by any feed) is reused, so that several pages ask the chain once; a new one is
        kept in `money_points` unless it failed (a gap, not a fall to 0)."""
        now = trio.current_time()
        if self.money_points and now - self.money_points[-1][0] < MONEY_EVERY * self.interval_s / 2:
            return self.money_points[-1][1]
        with trio.move_on_after(MONEY_TIMEOUT_S):
            point = {**await views.money_totals(self.call), "at": round(time.time(), 3)}
            if "error" not in point:
                self.money_points.append((now, point))
            return point
        return {"error": f"earnings took longer than {MONEY_TIMEOUT_S:g} s"}

    async def _nodes(self) -> Any:
        try:
            return await self.call("nodes_find")
        except views.RPCFailed as exc:
            return {"error": exc.message}

    async def _event(
        self, conn: h11.Connection, stream: trio.abc.Stream, name: str, data: Any
    ) -> None:
        text = json.dumps(data, separators=(",", ":"), default=str)
        chunk = f"event: {name}\ndata: {text}\n\n".encode()
        await self._write(stream, conn.send(h11.Data(data=chunk)))

    async def _write(self, stream: trio.abc.Stream, data: bytes | None) -> None:
        if data:
            with trio.fail_after(self.write_timeout_s):
                await stream.send_all(data)

    def _reject(self, reason: str) -> None:
        try:
            self.on_reject(reason)
        except Exception:
            log.exception("on_reject hook failed")
