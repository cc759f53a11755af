"""The admin dashboard (Jinja2 + htmx), served by the appliance's Litestar app under ``/admin``.

``create_app`` mounts it with one plugin, :class:`DashboardPlugin`, which contributes
everything the dashboard needs and nothing app-wide: a router with its own session,
CSRF and security-header middleware (the WebSocket endpoint and the token-header HTTP
API are untouched), the template engine, the session store and the static files.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path
from typing import Any

from litestar import Router
from litestar.config.app import AppConfig
from litestar.config.csrf import CSRFConfig
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.server_side import ServerSideSessionConfig
from litestar.plugins import InitPluginProtocol
from litestar.plugins.htmx import HTMXConfig, HTMXPlugin, HTMXRequest
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.stores.registry import StoreRegistry
from litestar.template.config import TemplateConfig
from redis.exceptions import RedisError

from appliance.settings import Settings

from .actions import ACTION_ROUTES
from .auth import SESSION_COOKIE, LoginLimiter
from .bans import BAN_ROUTES
from .live import PresenceWatcher
from .oidc import OIDC_ROUTES
from .pages import PREFIX, ROUTES, DashboardState, auth_failed, forbidden
from .security import SecurityHeadersMiddleware
from .system import SYSTEM_ROUTES
from .templating import configure_environment

__all__ = ["PREFIX", "DashboardPlugin"]

HERE = Path(__file__).resolve().parent
SESSION_STORE = "wsbridge-dashboard-sessions"
CSRF_COOKIE = "wsb_csrf"
CSRF_SEED_KEY = "wsb:dashboard:csrf-seed"

log = logging.getLogger(__name__)


def _stores(settings: Settings) -> tuple[Store, Store, Any, Any]:
    """(sessions, failed logins, close, shared seed): in Redis when configured, so every instance sees the same."""
    if settings.redis_enabled:
        from litestar.stores.redis import RedisStore

        from appliance.brokers.redis import RedisTarget

        target = RedisTarget.from_settings(settings)  # One URL, Sentinels or a Cluster.
        root = RedisStore(target.client(max_connections=32), namespace="wsb:dashboard")

        async def close() -> None:
            await root._redis.aclose()  # It owns its pool (RedisTarget.client).

        def shared_seed() -> str:
            # Created once by whichever instance starts first, never expires: survives restarts and deploys.
            # Read at start, synchronously: Litestar copies the router (and its CSRF config) when mounting it.
            with target.sync_client(socket_connect_timeout=3, socket_timeout=3) as sync:
                sync.set(CSRF_SEED_KEY, secrets.token_hex(32), nx=True)
                return sync.get(CSRF_SEED_KEY).decode()

        return root.with_namespace("session"), root.with_namespace("login"), close, shared_seed

    async def nothing() -> None:
        pass

    return MemoryStore(), MemoryStore(), nothing, None


def _csrf_secret(settings: Settings, seed: str | None = None) -> str:
    """Shared by every instance (they share the admin token), so any instance checks any page's token.

    Without ADMIN_TOKEN in the settings (tokens in SSM) the seed is a random one kept in Redis; the
    instance id would differ per instance (a POST landing on another one is refused) and is guessable.
    """
    if seed is None:
        # Tokens in SSM and no Redis to share a seed: one instance, so a random secret of its own
        # (a restart invalidates open pages' forms, which then reload; the instance id was guessable).
        seed = settings.admin_token.get_secret_value() if settings.admin_token else secrets.token_hex(32)
    return hmac.new(seed.encode(), b"wsbridge dashboard csrf", hashlib.sha256).hexdigest()


class DashboardPlugin(InitPluginProtocol):
    """Mounts the dashboard on an app whose state holds ``relay``, ``settings`` and ``audit``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        settings = self.settings
        sessions, logins, close_stores, shared_seed = _stores(settings)
        session_config = ServerSideSessionConfig(
            key=SESSION_COOKIE,
            store=SESSION_STORE,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            max_age=settings.dashboard_idle_timeout,  # Cookie and store entry; both renewed by each response.
            exclude=[f"^{PREFIX}/static/"],
        )
        seed = None
        if settings.admin_token is None and shared_seed is not None:
            try:
                seed = shared_seed()
            except (RedisError, OSError) as exc:
                log.warning(
                    "Dashboard CSRF secret not shared (%s): a POST to another instance fails", type(exc).__name__
                )
        csrf = CSRFConfig(
            secret=_csrf_secret(settings, seed),
            cookie_name=CSRF_COOKIE,
            cookie_path=PREFIX,
            cookie_httponly=True,  # Scripts never read it: the page carries the token for htmx's headers.
            cookie_samesite="strict",
            exclude=[f"^{PREFIX}/static/"],
        )
        router = Router(
            path=PREFIX,
            route_handlers=[
                *ROUTES,
                *ACTION_ROUTES,
                *BAN_ROUTES,
                *SYSTEM_ROUTES,
                *(OIDC_ROUTES if settings.oidc_enabled else ()),  # Single sign-on only when OIDC_ISSUER is set.
                create_static_files_router(path="/static", directories=[HERE / "static"], name="dashboard-static"),
            ],
            middleware=[
                SecurityHeadersMiddleware(),
                session_config.middleware,
                DefineMiddleware(CSRFMiddleware, config=csrf),
            ],
            request_class=HTMXRequest,
            exception_handlers={NotAuthorizedException: auth_failed, PermissionDeniedException: forbidden},
            include_in_schema=False,
        )
        app_config.route_handlers.append(router)
        app_config.template_config = TemplateConfig(
            directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=configure_environment
        )
        registry = app_config.stores
        if registry is None:
            app_config.stores = {SESSION_STORE: sessions}
        elif isinstance(registry, StoreRegistry):
            registry.register(SESSION_STORE, sessions)
        else:
            registry[SESSION_STORE] = sessions
        app_config.state["dashboard"] = DashboardState(
            PresenceWatcher(app_config.state["relay"]), LoginLimiter(logins), session_config
        )

        app_config.on_shutdown.append(close_stores)
        # The htmx plugin, without making HTMXRequest the request class of the whole app.
        return HTMXPlugin(HTMXConfig(set_request_class_globally=False)).on_app_init(app_config)
