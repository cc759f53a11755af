"""OpenID Connect sign-in to the dashboard (``OIDC_ISSUER``): the company's identity provider instead of a token.

Built on Authlib (its httpx client for the code exchange, :class:`authlib.oidc.core.CodeIDToken`
on joserfc for the ID token) rather than by hand, because hand-written token validation is where
such integrations go wrong. The flow is the authorization-code flow with PKCE (S256), ``state``
and ``nonce``:

1. ``GET /admin/login/oidc`` keeps a pending sign-in (state, nonce, PKCE verifier, where to go
   next) in the session store for ten minutes under a random id, sets that id in a cookie
   (HttpOnly, SameSite=Lax so the provider's redirect back brings it, limited to this path) and
   sends the browser to the provider.
2. ``GET /admin/login/oidc/callback`` takes the pending sign-in out of the store (once: a replay
   finds nothing), compares ``state``, exchanges the code with the verifier and the client
   secret, and checks the ID token: signature against the provider's JWKS, ``iss``, ``aud``
   (and ``azp``), ``exp``, ``iat`` and ``nonce``.
3. The person named by the first of ``OIDC_NAME_CLAIMS`` gets the role the allow-lists give them,
   or a page saying they may not sign in: nobody is admin by default. The session is the one the
   token sign-in makes (same cookie, CSRF, lifetimes, sign-out); the audit trail names the person.

The session cookie is SameSite=Strict, which a browser does not send on a navigation that a
redirect from the provider started: the callback answers with a page that moves on by itself
(``Refresh``), a same-site navigation that carries it. Neither the code, the tokens nor the
client secret are logged or stored; the secret is in the log redaction list all the same.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from litestar import Request, Response, get
from litestar.datastructures import Cookie
from litestar.params import FromQuery
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER
from litestar.stores.redis import RedisStore

from appliance.settings import Settings

from .auth import OIDC_SESSION, LoginLimiter, Principal, begin_session
from .pages import PREFIX, _audit, _common, _dashboard, _forget_expired, _remote, _safe_next, _sso, token_sign_in

#: What a request to the provider raises when it cannot be made or answered. Authlib's httpx client
#: runs on httpx2 where it is installed (the MCP SDK brings it), else on httpx.
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, ValueError)
try:
    from httpx2 import HTTPError as _Httpx2Error

    _TRANSPORT_ERRORS += (_Httpx2Error,)
except ImportError:  # pragma: no cover
    pass

__all__ = ["CALLBACK", "OIDC_ROUTES", "OIDC_SESSION", "PENDING_COOKIE", "OidcRefused", "Provider", "verify_id_token"]

log = logging.getLogger(__name__)

START = PREFIX + "/login/oidc"
CALLBACK = START + "/callback"
PENDING_COOKIE = "wsb_oidc"
PENDING_SECONDS = 600
_PENDING_KEY = "oidc-pending:"
METADATA_SECONDS = 3600
#: How long a failed read of the discovery document is answered from memory: sign-ins waiting for
#: the lock do not each wait out their own timeout against a provider that is down or slow.
FAILURE_SECONDS = 10.0
LEEWAY_SECONDS = 60
HTTP_TIMEOUT = 10.0
#: Sign-ins one address may start per window: each keeps a pending entry for PENDING_SECONDS, and the
#: start needs no credentials, so without a bound anybody could fill the session store.
STARTS_PER_ADDRESS = 20
STARTS_WINDOW_SECONDS = 60


class OidcRefused(Exception):
    """A sign-in that does not go through: ``message`` is shown to the person, ``reason`` audited."""

    def __init__(self, message: str, reason: str, status: int = 400, actor: str = "unknown") -> None:
        super().__init__(reason)
        self.message, self.reason, self.status, self.actor = message, reason, status, actor


@dataclass(frozen=True, slots=True)
class Pending:
    state: str
    nonce: str
    verifier: str
    next: str


def verify_id_token(
    id_token: str,
    jwks: dict[str, Any],
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    access_token: str | None = None,
    algorithms: list[str] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The ID token's claims once Authlib has checked them, else :class:`OidcRefused` saying what failed.

    The signature is checked with joserfc against the provider's keys, only for the algorithms the
    provider announces (never ``none``, never HS256 keyed with a public key); the claims by
    Authlib's :class:`CodeIDToken`: ``iss`` and ``aud`` essential and equal to ours, ``exp``/``iat``
    with a minute of leeway, ``nonce`` equal to the one this sign-in sent, ``at_hash`` if present.
    """
    from authlib.oidc.core import CodeIDToken

    allowed = [alg for alg in (algorithms or []) if alg != "none" and not alg.startswith("HS")] or ["RS256"]
    try:
        keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        decoded = jwt.decode(id_token, keys, registry=JWSRegistry(algorithms=allowed))
    except InvalidKeyIdError:
        raise  # The caller reloads the provider's keys once (rotation) and tries again.
    except (JoseError, ValueError, KeyError, TypeError) as exc:  # A malformed token or key set too.
        raise OidcRefused(_UNVERIFIED, f"id token signature: {type(exc).__name__}") from None
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": issuer},
        "aud": {"essential": True, "value": client_id},
    }
    params = {"nonce": nonce, "client_id": client_id}
    if access_token:
        params["access_token"] = access_token
    claims = CodeIDToken(decoded.claims, decoded.header, options, params)
    try:
        claims.validate(now=int(now) if now is not None else None, leeway=LEEWAY_SECONDS)
    except JoseError as exc:
        raise OidcRefused(_UNVERIFIED, f"id token {exc.error}: {getattr(exc, 'claim', '')}".rstrip(": ")) from None
    return dict(claims)


_UNVERIFIED = "The identity provider's answer could not be verified; sign-in refused. Try again, or use a token."
_EXPIRED = "This sign-in has expired or was already used. Start again."


def _client(settings: Settings) -> Any:
    # Authlib 1.9 prefers the httpx2 fork and warns when it falls back to httpx, which the project uses.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client

    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
    return AsyncOAuth2Client(
        settings.oidc_client_id,
        secret,
        token_endpoint_auth_method="client_secret_basic" if secret else "none",
        code_challenge_method="S256",
        redirect_uri=redirect_uri(settings),
        scope=_scopes(settings),
        timeout=HTTP_TIMEOUT,
    )


def redirect_uri(settings: Settings) -> str:
    """From OIDC_REDIRECT_BASE_URL or PUBLIC_URL, never from the request's Host header (which a client chooses)."""
    return (settings.oidc_redirect_base() or "") + CALLBACK


def _scopes(settings: Settings) -> str:
    scopes = settings.oidc_scopes.split()
    return " ".join(scopes if "openid" in scopes else ["openid", *scopes])


class Provider:
    """The provider's discovery document and keys, read when first needed and again after an hour."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._metadata: dict[str, Any] | None = None
        self._jwks: dict[str, Any] | None = None
        self._loaded = 0.0
        self._failed: tuple[float, OidcRefused] | None = None  # (until when, the refusal) after a failed read
        self._lock = asyncio.Lock()
        self.taking = asyncio.Lock()  # Pending sign-ins in a memory store are taken under it (once).
        self.starts: LoginLimiter | None = None  # Sign-ins started per address (ui/oidc.py, oidc_start).

    async def metadata(self) -> dict[str, Any]:
        async with self._lock:
            if self._metadata is None or time.monotonic() - self._loaded > METADATA_SECONDS:
                if self._failed is not None and time.monotonic() < self._failed[0]:
                    raise self._failed[1]
                try:
                    found = await self._discover()
                except OidcRefused as refused:
                    self._failed = (time.monotonic() + FAILURE_SECONDS, refused)
                    raise
                self._metadata, self._jwks, self._loaded, self._failed = found, None, time.monotonic(), None
            return self._metadata

    async def _discover(self) -> dict[str, Any]:
        issuer = (self.settings.oidc_issuer or "").rstrip("/")
        found = await self._get_json(issuer + "/.well-known/openid-configuration")
        if str(found.get("issuer", "")).rstrip("/") != issuer:
            raise OidcRefused(_UNAVAILABLE, "discovery: the issuer differs from OIDC_ISSUER", 502)
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(found.get(key), str):
                raise OidcRefused(_UNAVAILABLE, f"discovery: no {key}", 502)
        return found

    async def jwks(self, reload: bool = False) -> dict[str, Any]:
        metadata = await self.metadata()
        if self._jwks is None or reload:
            self._jwks = await self._get_json(metadata["jwks_uri"])
        return self._jwks

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                response = await client.get(url)
                response.raise_for_status()
                found = response.json()
        except _TRANSPORT_ERRORS as exc:
            raise OidcRefused(_UNAVAILABLE, f"{urlsplit(url).path}: {type(exc).__name__}", 502) from None
        if not isinstance(found, dict):
            raise OidcRefused(_UNAVAILABLE, f"{urlsplit(url).path}: not a JSON object", 502)
        return found

    async def start(self, next_path: str) -> tuple[str, Pending]:
        """The provider's authorization URL for a new sign-in, and what the callback must find again."""
        from authlib.common.security import generate_token

        metadata = await self.metadata()
        pending = Pending(generate_token(32), generate_token(32), generate_token(64), next_path)
        async with _client(self.settings) as client:
            url, _ = client.create_authorization_url(
                metadata["authorization_endpoint"],
                state=pending.state,
                nonce=pending.nonce,
                code_verifier=pending.verifier,
            )
        return url, pending

    async def finish(self, pending: Pending, code: str) -> dict[str, Any]:
        """Exchange the code (with the PKCE verifier) and return the verified ID token's claims."""
        from authlib.integrations.base_client import OAuthError

        metadata = await self.metadata()
        try:
            async with _client(self.settings) as client:
                token = await client.fetch_token(
                    metadata["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=pending.verifier,
                )
        except OAuthError as exc:  # The provider refused the code: used, expired, or not ours.
            raise OidcRefused(_NOT_ACCEPTED, f"token endpoint: {exc.error}") from None
        except _TRANSPORT_ERRORS as exc:
            raise OidcRefused(_UNAVAILABLE, f"token endpoint: {type(exc).__name__}", 502) from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise OidcRefused(_UNVERIFIED, "token endpoint: no id_token")
        verify: dict[str, Any] = {
            "issuer": metadata["issuer"],
            "client_id": self.settings.oidc_client_id or "",
            "nonce": pending.nonce,
            "access_token": token.get("access_token"),
            "algorithms": metadata.get("id_token_signing_alg_values_supported"),
        }
        try:
            return verify_id_token(id_token, await self.jwks(), **verify)
        except InvalidKeyIdError:  # The provider rotated its keys since they were read: read them once more.
            try:
                return verify_id_token(id_token, await self.jwks(reload=True), **verify)
            except InvalidKeyIdError:
                raise OidcRefused(_UNVERIFIED, "id token signed with an unknown key") from None


_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # RFC 6749's error codes (access_denied, ...)
_UNAVAILABLE = "The identity provider could not be reached or answered unexpectedly. Try again later, or use a token."
_NOT_ACCEPTED = "The identity provider did not accept this sign-in (it may have been used already). Start again."


def operator_of(settings: Settings, claims: dict[str, Any]) -> tuple[str, str]:
    """(name, role) of the person the claims describe, or :class:`OidcRefused` if they may not sign in."""
    name = ""
    for claim in (c.strip() for c in settings.oidc_name_claims.split(",") if c.strip()):
        value = claims.get(claim)
        if claim != "email" and isinstance(value, str) and "@" in value:
            # An address only counts from the email claim, which the provider verifies: a username
            # a person may choose (preferred_username) must not become a listed admin's address.
            continue
        if isinstance(value, str) and value.strip():
            # Some providers send the boolean as a string ("false"): that is unverified too.
            if claim == "email" and str(claims.get("email_verified")).lower() == "false":
                raise OidcRefused(
                    "Your email address is not verified at the identity provider.", "email not verified", 403, value
                )
            name = value.strip()
            break
    if not name:
        raise OidcRefused(
            "The identity provider did not say who you are (no " + settings.oidc_name_claims + ").",
            "no name claim",
            403,
        )
    groups = claims.get(settings.oidc_groups_claim, []) if settings.oidc_groups_claim else []
    role = settings.oidc_role(name, groups if isinstance(groups, list) else [groups])
    if role is None:
        raise OidcRefused(
            f"{name} may not sign in to this dashboard. Ask an administrator to add you to OIDC_ADMINS or OIDC_VIEWERS.",
            "not on the allow-list",
            403,
            name,
        )
    return name, role


def _provider(request: Request) -> Provider:
    dashboard = _dashboard(request)
    if dashboard.oidc is None:  # One per app: the discovery document and keys are read once an hour.
        dashboard.oidc = Provider(request.app.state.settings)
    return dashboard.oidc


def _store(request: Request) -> Any:
    return _dashboard(request).session_config.get_store_from_app(request.app)


def _refused(request: Request, refused: OidcRefused) -> Response[Any]:
    response = Template(
        "login.html",
        context=_common(
            request, next=PREFIX + "/clients", enabled=token_sign_in(request), error=refused.message, **_sso(request)
        ),
        status_code=refused.status,
    )
    response.cookies.append(_pending_cookie("", 0))
    return response


def _pending_cookie(value: str, max_age: int) -> Cookie:
    return Cookie(key=PENDING_COOKIE, value=value, path=START, httponly=True, samesite="lax", max_age=max_age)


@get("/login/oidc")
async def oidc_start(request: Request, next: FromQuery[str | None] = None) -> Response[Any]:
    request.clear_session()
    provider = _provider(request)
    if provider.starts is None:  # The login limiter's store (Redis when configured): counted cluster-wide.
        store = _dashboard(request).limiter.store
        provider.starts = LoginLimiter(store, STARTS_PER_ADDRESS, STARTS_WINDOW_SECONDS)
    wait = await provider.starts.attempt("oidc-start:" + _remote(request))
    if wait:
        message = f"Too many sign-ins were started from your address; try again in {wait} s."
        return _refused(request, OidcRefused(message, "too many sign-ins started", 429))
    try:
        url, pending = await provider.start(_safe_next(next))
    except OidcRefused as refused:
        log.warning("OIDC sign-in not started: %s", refused.reason)
        return _refused(request, refused)
    pending_id = secrets.token_urlsafe(32)
    await _forget_expired(request)  # Memory stores drop abandoned sign-ins only when asked.
    await _store(request).set(_PENDING_KEY + pending_id, _encode(pending), expires_in=PENDING_SECONDS)
    response = Redirect(url, status_code=HTTP_303_SEE_OTHER)
    response.cookies.append(_pending_cookie(pending_id, PENDING_SECONDS))
    return response


@get("/login/oidc/callback")
async def oidc_callback(request: Request) -> Response[Any]:
    request.clear_session()
    params = request.query_params
    try:
        pending = await _take_pending(request)
        if params.get("error"):
            # The provider said no (the person cancelled, or is not assigned to the app): its code, not its text.
            error = str(params.get("error"))
            error = error if _ERROR_CODE.fullmatch(error) else "unrecognised error"  # no text of a link's choosing
            raise OidcRefused(f"The identity provider refused the sign-in ({error}).", f"provider: {error}", 403)
        if not hmac.compare_digest(str(params.get("state", "")).encode(), pending.state.encode()):
            raise OidcRefused(_EXPIRED, "state mismatch")
        code = params.get("code")
        if not code:
            raise OidcRefused(_EXPIRED, "no code")
        claims = await _provider(request).finish(pending, str(code))
        name, role = operator_of(request.app.state.settings, claims)
    except OidcRefused as refused:
        await _audit(request, "login.failed", refused.actor, via="oidc", detail=refused.reason)
        log.warning("OIDC sign-in refused (%s) for %s", refused.reason, refused.actor)
        return _refused(request, refused)
    settings: Settings = request.app.state.settings
    begin_session(request, Principal(role, name, settings.oidc_session_version(), OIDC_SESSION), time.time())
    await _audit(request, "login", name, role=role, via="oidc")
    # A page, not a redirect: the browser would not send the SameSite=Strict session cookie on a
    # navigation the provider's redirect started; this page's own navigation is same-site.
    response = Template(
        "oidc_done.html",
        context=_common(request, next=pending.next, name=name),
        headers={"refresh": f"0;url={pending.next}"},
    )
    response.cookies.append(_pending_cookie("", 0))
    return response


async def _take_pending(request: Request) -> Pending:
    """The pending sign-in this browser started, removed from the store: a second callback finds nothing."""
    pending_id = request.cookies.get(PENDING_COOKIE, "")
    if not pending_id:
        raise OidcRefused(_EXPIRED, "no pending sign-in cookie")
    store, key = _store(request), _PENDING_KEY + pending_id
    if isinstance(store, RedisStore):  # One GETDEL: two instances cannot both take it.
        raw = await store._redis.getdel(store._make_key(key))
    else:  # A memory store: one process, so one lock makes reading and deleting one step.
        async with _provider(request).taking:
            raw = await store.get(key)
            await store.delete(key)
    if raw is None:
        raise OidcRefused(_EXPIRED, "pending sign-in unknown, used or expired")
    return _decode(raw)


def _encode(pending: Pending) -> bytes:
    return json.dumps(asdict(pending)).encode()


def _decode(raw: bytes | str) -> Pending:
    return Pending(**json.loads(raw))


OIDC_ROUTES = [oidc_start, oidc_callback]
