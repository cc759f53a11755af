"""The dashboard's pages: sign-in, clients (page, table, live stream), client detail, audit, system.

Handlers only read through the relay's service methods (``Relay.clients()``,
``Relay.status()``) and the audit trail on ``app.state``; they never touch connections.
A page and its htmx partial come from the same template: the partial is a block of it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2_fragments import render_block
from jinja2_fragments.litestar import HTMXBlockTemplate
from litestar import MediaType, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware.session.server_side import ServerSideSessionBackend
from litestar.params import FromQuery
from litestar.plugins.htmx import ClientRedirect, HTMXRequest
from litestar.response import Redirect, ServerSentEvent, Template
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_303_SEE_OTHER, HTTP_403_FORBIDDEN, HTTP_429_TOO_MANY_REQUESTS
from litestar.stores.memory import MemoryStore

from appliance import __version__
from appliance.audit import AuditEvent
from appliance.brokers.base import BrokerUnavailable

from .auth import (
    BACKGROUND_HEADER,
    LoginLimiter,
    authenticate,
    begin_session,
    principal_of,
    require_session,
    session_problem,
)
from .live import PresenceWatcher
from .query import AUDIT_LIMITS, PAGE_SIZES, SORTS, AuditQuery, ClientQuery, run_query

__all__ = ["PREFIX", "ROUTES", "DashboardState", "auth_failed", "forbidden"]

log = logging.getLogger(__name__)

PREFIX = "/admin"
LOGIN = PREFIX + "/login"
#: Pages may show presence this many seconds old (one shared read serves every page meanwhile).
PRESENCE_MAX_AGE = 1.0
#: Closed connections shown on a client's page (the broker keeps HISTORY_PER_CLIENT at most).
HISTORY_SHOWN = 50
#: Seconds between the event stream's checks that its session is still valid.
SESSION_RECHECK_SECONDS = 5.0


class DashboardState:
    """What the dashboard keeps per app: the shared presence poller, the login limiter, the session config."""

    def __init__(self, watcher: PresenceWatcher, limiter: LoginLimiter, session_config: Any) -> None:
        self.watcher = watcher
        self.limiter = limiter
        self.session_config = session_config
        self.oidc: Any = None  # ui.oidc.Provider when OIDC_ISSUER is set


def _dashboard(request: Request) -> DashboardState:
    return request.app.state.dashboard


def _remote(request: Request) -> str:
    client = request.scope.get("client")
    return client[0] if client else "unknown"


async def _audit(request: Request, action: str, actor: str, target: str = "", **detail: Any) -> None:
    await request.app.state.audit.record(AuditEvent(action, actor, _remote(request), target, detail))


def services(request: Request) -> dict[str, bool]:
    """Which action pages this build offers: those whose service exists on app.state."""
    state = request.app.state
    return {
        "send": hasattr(state, "commands"),
        "tokens": hasattr(state, "token_service"),
        "bans": hasattr(state, "bans"),
    }


def _common(request: Request, **context: Any) -> dict[str, Any]:
    session = request.scope.get("session")
    return {
        "services": services(request),
        "principal": principal_of(request) if isinstance(session, dict) and session.get("role") else None,
        "version": __version__,
        "instance": request.app.state.relay.instance,
        "prefix": PREFIX,
        "background_header": BACKGROUND_HEADER,
        **context,
    }


# --- errors: an expired session sends the whole page to the login, never into a table cell ---


def auth_failed(request: Request, exc: NotAuthorizedException) -> Response[Any]:
    if request.url.path == PREFIX + "/events":
        # EventSource cannot follow redirects to a page: tell the page, which redirects itself.
        return ServerSentEvent([ServerSentEventMessage(event="expired", data="signed out")])
    if request.headers.get("hx-request") == "true":
        return ClientRedirect(LOGIN)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return Redirect(f"{LOGIN}?{urlencode({'next': target})}", status_code=HTTP_303_SEE_OTHER)


def forbidden(request: Request, exc: PermissionDeniedException) -> Response[str]:
    return Response(f"Forbidden: {exc.detail}", status_code=HTTP_403_FORBIDDEN, media_type=MediaType.TEXT)


# --- sign-in ----------------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Only a dashboard path: never an open redirect to another site."""
    # Printable ASCII: it goes into a Location or Refresh header, where anything else fails the response.
    if (
        value
        and value.startswith(PREFIX + "/")
        and ".." not in value
        and "\\" not in value
        and value.isascii()
        and value.isprintable()
    ):
        parts = urlsplit(value)
        if not parts.scheme and not parts.netloc:
            return value
    return PREFIX + "/clients"


async def _forget_expired(request: Request) -> None:
    """Memory stores drop expired entries only when asked (Redis expires keys itself): ask at each sign-in."""
    dashboard = _dashboard(request)
    for store in (dashboard.session_config.get_store_from_app(request.app), dashboard.limiter.store):
        if isinstance(store, MemoryStore):
            await store.delete_expired()


def token_sign_in(request: Request) -> bool:
    """Whether a token can sign in: admin tokens (ADMIN_TOKEN, admin_tokens/<name>) may live only in the
    token store (SSM in production)."""
    store = getattr(request.app.state, "token_store", None)
    if store is not None:
        return any(s.role == "admin" for s in store.states.values())
    return request.app.state.settings.admin_token is not None


def _sso(request: Request) -> dict[str, Any]:
    """The sign-in page's "Sign in with <provider>" (OIDC_ISSUER, ui/oidc.py), absent when not configured."""
    settings = request.app.state.settings
    return {"oidc_name": settings.oidc_provider_name if settings.oidc_enabled else None}


@get("/", sync_to_thread=False)
def index() -> Redirect:
    return Redirect(PREFIX + "/clients", status_code=HTTP_303_SEE_OTHER)


@get("/login")
async def login_page(request: HTMXRequest, next: FromQuery[str | None] = None) -> Response[Any]:
    if session_problem(request.app.state, request.scope.get("session"), time.time()) is None:
        return Redirect(_safe_next(next), status_code=HTTP_303_SEE_OTHER)  # Already signed in.
    request.clear_session()  # A visitor gets no session (and no store entry) before signing in.
    enabled = token_sign_in(request)
    return Template(
        "login.html", context=_common(request, next=_safe_next(next), enabled=enabled, error="", **_sso(request))
    )


@post("/login")
async def login(request: HTMXRequest) -> Response[Any]:
    form = await request.form()
    address = _remote(request)
    limiter = _dashboard(request).limiter
    next_path = _safe_next(form.get("next"))
    wait = await limiter.attempt(address)  # Counted before the token is judged: a burst gets five judged at most.
    if wait:
        request.clear_session()
        await _audit(request, "login.refused", "unknown", detail="rate limited")
        return Template(
            "login.html",
            context=_common(
                request, next=next_path, enabled=True, error=f"Too many failed attempts; try again in {wait} s."
            ),
            status_code=HTTP_429_TOO_MANY_REQUESTS,
            headers={"retry-after": str(wait)},
        )
    principal = authenticate(request.app.state, str(form.get("token") or ""))
    if principal is None:
        await _forget_expired(request)
        request.clear_session()
        await _audit(request, "login.failed", "unknown")
        return Template(
            "login.html",
            context=_common(
                request, next=next_path, enabled=True, error="That token is not valid here.", **_sso(request)
            ),
            status_code=401,
        )
    await limiter.succeeded(address)
    await _forget_expired(request)
    begin_session(request, principal, time.time())
    await _audit(request, "login", principal.name, role=principal.role)
    return Redirect(next_path, status_code=HTTP_303_SEE_OTHER)


@post("/logout", guards=[require_session])
async def logout(request: HTMXRequest) -> Response[Any]:
    actor = principal_of(request).name
    request.clear_session()
    await _audit(request, "logout", actor)
    if request.htmx:
        return ClientRedirect(LOGIN)
    return Redirect(LOGIN, status_code=HTTP_303_SEE_OTHER)


@get("/session", guards=[require_session])
async def session_check() -> Response[None]:
    """Asked by the page when its event stream says the session ended: answers with the redirect."""
    return Response(None, status_code=204)


# --- clients ------------------------------------------------------------------------------------


async def _records(request: Request) -> tuple[list[dict[str, Any]], str]:
    try:
        return await _dashboard(request).watcher.records(PRESENCE_MAX_AGE), ""
    except BrokerUnavailable as exc:
        return [], str(exc)


@get("/clients", guards=[require_session])
async def clients_page(request: HTMXRequest) -> Response[Any]:
    query = ClientQuery.from_params(dict(request.query_params))
    read_started = time.perf_counter()
    records, error = await _records(request)
    timing = {"server-timing": f"presence;dur={(time.perf_counter() - read_started) * 1000:.1f}"}
    page = run_query(records, query)
    watcher = _dashboard(request).watcher
    counters, digest = watcher.describe(records)
    menus = watcher.facets(records)
    context = _common(
        request,
        query=query,
        page=page,
        facets=menus,
        counters=counters,
        digest=digest,
        can_disconnect=services(request)["send"] and principal_of(request).can_act,
        sorts=SORTS,
        page_sizes=PAGE_SIZES,
        error=error,
        urlencode=urlencode,
    )
    partial = request.htmx and not request.htmx.history_restore_request and request.htmx.target == "clients-table"
    if partial:
        return HTMXBlockTemplate(template_name="clients.html", block_name="table", context=context, headers=timing)
    return Template("clients.html", context=context, headers=timing)


#: What the viewer token does not see of a recent command unless VIEWER_SEES_MESSAGES is set.
_TEXTS = frozenset({"message", "reply"})


@get("/client", guards=[require_session])
async def client_detail(request: HTMXRequest, id: FromQuery[str] = "") -> Response[Any]:
    """One id's page; the id is a query parameter, so any id (even a forged one with a slash) has a URL."""
    client_id = id
    records, error = await _records(request)
    entries = sorted((r for r in records if r.get("id") == client_id), key=lambda r: str(r.get("instance")))
    now = time.time()
    rates = [_dashboard(request).watcher.client_rates.rates(r, now) for r in entries]
    events = [e for e in await request.app.state.audit.recent(1000) if e.target == client_id][:50]
    relay = request.app.state.relay
    try:
        history, history_error = await relay.history(client_id, HISTORY_SHOWN), ""
    except BrokerUnavailable as exc:
        history, history_error = [], str(exc)
    settings = request.app.state.settings
    # Kept by the instances that hold or held the id (appliance/core/recent.py), asked by appliance/recent.py.
    recent, recent_silent = await request.app.state.recent.read(client_id, history)
    texts_shown = principal_of(request).can_act or settings.viewer_sees_messages
    if not texts_shown:  # Outcome, time and round trip only: texts are what the devices are told and answer.
        recent = [{key: value for key, value in c.items() if key not in _TEXTS} for c in recent]
    context = _common(
        request,
        client_id=client_id,
        entries=list(zip(entries, rates, strict=True)),
        events=events,
        error=error,
        history=history,
        history_error=history_error,
        history_kept={
            "where": "in Redis, shared by every instance" if settings.redis_enabled else "in this instance's memory",
            "per_client": settings.history_per_client,
            "days": round(settings.history_ttl_seconds / 86400, 1),
        },
        recent=recent,
        recent_silent=recent_silent,
        texts_shown=texts_shown,
        recent_kept={
            "per_client": settings.recent_commands_per_client,
            "chars": settings.recent_commands_max_chars,
            "minutes": round(settings.recent_commands_ttl_seconds / 60),
        },
        urlencode=urlencode,
    )
    if request.htmx and not request.htmx.history_restore_request and request.htmx.target == "client-live":
        return HTMXBlockTemplate(template_name="client.html", block_name="live", context=context)
    return Template("client.html", context=context)


async def _session_valid(request: Request, session_id: str | None) -> bool:
    """Re-read the session from the store: logout elsewhere, expiry and rotation end the stream."""
    if not session_id:
        return False
    config = _dashboard(request).session_config
    backend = ServerSideSessionBackend(config=config)
    raw = await backend.get(session_id, config.get_store_from_app(request.app))
    session = backend.deserialize_data(raw) if raw is not None else None
    return session_problem(request.app.state, session, time.time()) is None


@get("/events", guards=[require_session])
async def events(request: HTMXRequest, since: FromQuery[str] = "") -> ServerSentEvent:
    """One stream per page: counters on change, a throttled "changed" signal, "expired" at the end.

    ``since`` is the membership digest the page was rendered with: if presence moved between
    the page and the stream, the first snapshot already says "changed".
    """
    dashboard = _dashboard(request)
    relay = request.app.state.relay
    session_id = request.get_session_id()
    engine: Any = request.app.template_engine
    engine = engine.engine  # The Jinja environment, for rendering one block per event.

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        digest, counters, checked = since[:64] or None, None, time.monotonic()
        yield ServerSentEventMessage(event="hello", data="live")
        iterator = dashboard.watcher.snapshots()
        try:
            async for snapshot in iterator:
                if relay.draining:  # Shutting down: let the page reconnect to another instance.
                    return
                if time.monotonic() - checked > SESSION_RECHECK_SECONDS:
                    checked = time.monotonic()
                    if not await _session_valid(request, session_id):
                        yield ServerSentEventMessage(event="expired", data="signed out")
                        return
                state = (snapshot.counters, snapshot.error)
                if state != counters:
                    counters = state
                    html = render_block(
                        engine, "clients.html", "counters", counters=snapshot.counters, error=snapshot.error
                    )
                    yield ServerSentEventMessage(event="counters", data=html)
                if snapshot.digest != digest and not snapshot.error:
                    if digest is not None:
                        yield ServerSentEventMessage(event="changed", data=snapshot.digest)
                    digest = snapshot.digest
        finally:
            await iterator.aclose()

    return ServerSentEvent(stream(), headers={"x-accel-buffering": "no"})


# --- audit trail ----------------------------------------------------------------------------------


#: The whole trail is read when a filter beyond the action is set (it is bounded: 1,000 events).
AUDIT_READ = 1000
CSV_COLUMNS = ("time_utc", "action", "actor", "source", "target", "detail")


async def _audit_events(request: Request, query: AuditQuery) -> list[AuditEvent]:
    return query.select(await request.app.state.audit.recent(AUDIT_READ, query.action))


@get("/audit", guards=[require_session])
async def audit_page(request: HTMXRequest) -> Template:
    query = AuditQuery.from_params(dict(request.query_params))
    events = await _audit_events(request, query)
    context = _common(request, events=events, query=query, limits=AUDIT_LIMITS, urlencode=urlencode)
    return Template("audit.html", context=context)


def _csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text: never a formula (OWASP "CSV injection")."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


@get("/audit.csv", guards=[require_session])
async def audit_csv(request: HTMXRequest) -> Response[str]:
    """The filtered trail as CSV, as the page shows it (same filters, same limit)."""
    query = AuditQuery.from_params(dict(request.query_params))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for e in await _audit_events(request, query):
        at = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        detail = json.dumps(e.detail, sort_keys=True, separators=(",", ":"), default=str)
        writer.writerow([_csv_cell(str(v)) for v in (at, e.action, e.actor, e.source, e.target, detail)])
    name = f"wsbridge-audit-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


ROUTES = [
    index,
    login_page,
    login,
    logout,
    session_check,
    clients_page,
    client_detail,
    events,
    audit_page,
    audit_csv,
]
