"""Dashboard sign-in: a token exchanged for a server-side session, checked on every request.

The browser never holds the token: it is posted once to ``/admin/login`` and exchanged for
a random session id in an HttpOnly, SameSite=Strict cookie (Secure behind TLS, see
:mod:`ui.security`). The session lives in Litestar's server-side session store (Redis when
Redis is configured, so any instance serves any page; memory otherwise) and ends

- after ``DASHBOARD_IDLE_TIMEOUT`` seconds without a user action (background refreshes and
  the event stream do not count: a forgotten tab must not stay signed in forever),
- ``DASHBOARD_SESSION_LIFETIME`` seconds after sign-in, whatever happens,
- at logout, and when the token it was granted for changes (rotation ends every session).

Sign-in attempts are counted per remote address in the same store, atomically and before the
token is judged (:class:`LoginLimiter`); past the limit the address is refused with 429 until
the window ends, even with the right token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.stores.base import Store
from litestar.stores.redis import RedisStore
from litestar.utils.scope.state import ScopeState

from appliance.core.protocol import Role
from appliance.settings import Settings

__all__ = [
    "ADMIN",
    "BACKGROUND_HEADER",
    "LOGIN_FAILURES_ALLOWED",
    "LOGIN_WINDOW_SECONDS",
    "SESSION_COOKIE",
    "VIEWER",
    "OIDC_SESSION",
    "LoginLimiter",
    "Principal",
    "authenticate",
    "begin_session",
    "principal_of",
    "require_admin",
    "require_session",
    "session_problem",
]

SESSION_COOKIE = "wsb_session"
#: Sent by requests the page makes on its own (live refreshes): they do not count as activity.
BACKGROUND_HEADER = "x-dashboard-background"
ADMIN, VIEWER = Role.ADMIN.value, Role.VIEWER.value
LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW_SECONDS = 300
#: The token "name" of sessions made by OpenID Connect sign-in (ui/oidc.py): no token, the OIDC settings' version.
OIDC_SESSION = "oidc"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is signed in: a token's role, who acts with it, the token's name (never its value) and version."""

    role: str  # ADMIN or VIEWER
    name: str  # who acts, as the audit trail shows it: "alice" (admin_tokens/alice, ADMIN_TOKEN_NAME), else the token
    version: str
    token: str = ""  # the token's name, e.g. "ADMIN_TOKEN", "admin_tokens/alice" (default: ``name``)

    @property
    def token_name(self) -> str:
        return self.token or self.name

    @property
    def can_act(self) -> bool:
        return self.role == ADMIN


def _version_of(token: str) -> str:
    """A fingerprint of the token value: a changed token ends the sessions made with the old one
    (even where the store's version number does not move, as with a new value in ``.env``).

    Keyed with the token itself, so the stored value tells nothing about any other token.
    """
    return hmac.new(token.encode(), b"wsbridge dashboard session", hashlib.sha256).hexdigest()[:16]


def _dashboard_tokens(settings: Settings) -> list[tuple[str, str, str]]:
    """(role, name, value) of every token that may sign in to the dashboard (without a token store)."""
    tokens = []
    if settings.admin_token is not None:
        tokens.append((ADMIN, "ADMIN_TOKEN", settings.admin_token.get_secret_value()))
    if settings.viewer_token is not None:
        tokens.append((VIEWER, "VIEWER_TOKEN", settings.viewer_token.get_secret_value()))
    return tokens


def authenticate(app_state: Any, presented: str) -> Principal | None:
    """The one place that checks a dashboard token: the token store's comparator when the app has one.

    Only a token's current version signs in: a rotated-out admin token in its grace window still
    works for the API, but a dashboard session made with it would end at once.
    """
    store = getattr(app_state, "token_store", None)
    if store is not None:
        grant = store.lookup(presented)
        if grant is None or grant.role not in (ADMIN, VIEWER):
            return None
        version = _current_version(app_state, grant.name)
        if version is None or not version.startswith(f"{grant.version}:"):
            return None
        return Principal(grant.role, grant.actor(grant.name), version, grant.name)
    found = None
    labels = {"ADMIN_TOKEN": app_state.settings.admin_token_name}
    for role, name, value in _dashboard_tokens(app_state.settings):
        # Every comparison runs, so timing does not tell which token was close.
        if hmac.compare_digest(presented.encode(), value.encode()) and found is None:
            found = Principal(role, labels.get(name) or name, _version_of(value), name)
    return found


def _current_version(app_state: Any, name: str) -> str | None:
    """The version a session made now would carry; a session with another one has ended."""
    if name == OIDC_SESSION:
        settings: Settings = app_state.settings
        return settings.oidc_session_version() if settings.oidc_enabled else None
    store = getattr(app_state, "token_store", None)
    if store is not None:
        state = store.states.get(name)
        return f"{state.current.version}:{_version_of(state.current.value)}" if state is not None else None
    for _, token_name, value in _dashboard_tokens(app_state.settings):
        if token_name == name:
            return _version_of(value)
    return None


def begin_session(connection: ASGIConnection, principal: Principal, now: float) -> None:
    """Start a session under a fresh id: an id the browser brought along is never promoted (fixation)."""
    connection.cookies.pop(SESSION_COOKIE, None)  # The session backend reads the id from these cookies.
    ScopeState.from_scope(connection.scope).session_id = secrets.token_hex(32)
    connection.set_session(
        {
            "role": principal.role,
            "name": principal.token_name,
            "actor": principal.name,
            "version": principal.version,
            "created": now,
            "seen": now,
        }
    )


def session_problem(app_state: Any, session: Any, now: float) -> str | None:
    """Why this session is no longer valid, or None if it is."""
    if not isinstance(session, dict) or "role" not in session:
        return "not signed in"
    settings: Settings = app_state.settings
    if now - float(session.get("created", 0)) > settings.dashboard_session_lifetime:
        return "session lifetime reached"
    if now - float(session.get("seen", 0)) > settings.dashboard_idle_timeout:
        return "idle timeout"
    if _current_version(app_state, session.get("name", "")) != session.get("version"):
        return "token changed"
    return None


def principal_of(connection: ASGIConnection) -> Principal:
    session: Any = connection.scope.get("session") or {}
    # "name" is the token (sessions check its version); "actor" who acts with it (absent in older sessions).
    return Principal(session["role"], session.get("actor") or session["name"], session["version"], session["name"])


def require_session(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: a valid session, else 401 (the router turns it into a redirect to the login page)."""
    now = time.time()
    session: Any = connection.scope.get("session")
    if session_problem(connection.app.state, session, now) is not None:
        connection.clear_session()
        raise NotAuthorizedException("sign in to the dashboard")
    # The event stream (EventSource cannot send headers) and live refreshes are not user activity.
    background = connection.headers.get(BACKGROUND_HEADER) == "1" or connection.url.path.endswith("/events")
    if not background:
        session["seen"] = now  # A user action: the session middleware writes it back.


def require_admin(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Guard for actions: the viewer token sees everything and may do nothing."""
    require_session(connection, handler)
    if not principal_of(connection).can_act:
        raise PermissionDeniedException("the viewer token is read-only")


class LoginLimiter:
    """Sign-in attempts per remote address in a fixed window, counted atomically *before* the token is judged.

    Every attempt takes a number first; only the first ``allowed`` in a window are judged, the
    rest are refused unjudged, so a burst of 150 concurrent guesses gets at most five judged
    (reading, checking and writing back the count let every one of them through). A success
    gives its own number back rather than clearing the count: clearing it let the wrong guesses
    of a burst be judged after a concurrent right one. The count therefore holds the failures and
    the attempts in flight. In Redis, shared by every instance, counting is one MULTI (create
    with the window's expiry if absent, INCR, TTL); in memory, the same steps under a lock.
    """

    #: Gives a number back only while the window lives (a DECR of an expired key would create one without expiry).
    _GIVE_BACK = "if redis.call('exists', KEYS[1]) == 1 then return redis.call('decr', KEYS[1]) end return 0"

    def __init__(self, store: Store, allowed: int = LOGIN_FAILURES_ALLOWED, window: int = LOGIN_WINDOW_SECONDS) -> None:
        self.store = store
        self.allowed = allowed
        self.window = window
        self._lock = asyncio.Lock()

    async def attempt(self, address: str) -> int:
        """Count one attempt from ``address``: 0 if it may be judged, else the seconds until it may try again."""
        if isinstance(self.store, RedisStore):
            # The store's own client and key scheme, so the count lives next to the sessions (wsb:dashboard_login:*).
            key = self.store._make_key(address)
            pipe = self.store._redis.pipeline(transaction=True)
            pipe.set(
                key, 0, ex=self.window, nx=True
            )  # The window starts at the first attempt; later ones do not extend it.
            pipe.incr(key)
            pipe.ttl(key)
            _, count, ttl = await pipe.execute()
        else:
            async with self._lock:
                raw = await self.store.get(address)
                ttl = (await self.store.expires_in(address) if raw is not None else None) or self.window
                count = int(raw or 0) + 1
                await self.store.set(address, str(count), expires_in=ttl)
        if int(count) <= self.allowed:
            return 0
        return max(1, int(ttl) if ttl and int(ttl) > 0 else self.window)

    async def succeeded(self, address: str) -> None:
        """A judged attempt was right: it gives its number back (the failures stay counted)."""
        if isinstance(self.store, RedisStore):
            await self.store._redis.eval(self._GIVE_BACK, 1, self.store._make_key(address))
            return
        async with self._lock:
            raw = await self.store.get(address)
            remaining = await self.store.expires_in(address) if raw is not None else None
            if raw is not None and remaining:
                await self.store.set(address, str(max(0, int(raw) - 1)), expires_in=remaining)
