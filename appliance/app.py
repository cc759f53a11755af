"""The composition root: builds settings' collaborators once and hands each its own.

Settings → broker and token store → the local-connections registry, the recent-commands
logs, the command service and the relay → the recent-commands reader and the token service
→ the HTTP app (the WebSocket adapter, the probes, the HTTP API, ``/mcp`` and the
dashboard). Nothing below this module builds the objects it talks to, so nothing calls
back up into its creator; this is also the one module of ``appliance`` that imports the
dashboard (``ui``), which sits above the services it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.exceptions import ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from ui import DashboardPlugin

from . import __version__, metrics
from .admission import max_request_bytes
from .api import API_HANDLERS, ApiError, api_error, validation_as_422
from .api_schema import StrictStructSchemaPlugin, camel_case_operation_id
from .audit import AuditLog, MemoryAuditLog
from .bans import BanService
from .bans_api import BAN_HANDLERS
from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .commands import CommandService
from .commands.idempotency import key_budget
from .event_feed import EventFeed
from .events_http import EVENTS_HANDLERS
from .gate import Gate
from .heartbeat import Heartbeat
from .mcp_http import mcp_endpoint, mcp_lifespan
from .probes import PROBE_HANDLERS
from .recent import RecentCommands
from .recent_logs import RecentLogs
from .registry import LocalConnections
from .relay import Relay
from .settings import Settings
from .tokens import TokenStore, make_token_store
from .tokens.service import TokenService
from .web import relay_socket

__all__ = ["Relaying", "create_app", "make_audit_log", "make_broker", "wire_relay"]

log = logging.getLogger(__name__)


def make_broker(settings: Settings) -> Broker:
    queue: dict[str, Any] = {
        "queue_max": settings.offline_queue_max,
        # A delivered (controller, id) is remembered as long as any command may live.
        "queue_remember_seconds": settings.command_timeout_max_ms / 1000,
        "history_per_client": settings.history_per_client,
        "history_ttl": settings.history_ttl_seconds,
        "idempotency_window": settings.idempotency_window_seconds,
        "records_per_owner": settings.command_records_per_caller,
        "key_budget": key_budget(settings),
        "history_max_clients": settings.history_max_clients,
    }
    if not settings.redis_enabled:
        return MemoryBroker(**queue, queue_max_total=settings.offline_queue_max_total)
    from .brokers.redis import RedisBroker, RedisTarget

    return RedisBroker(
        RedisTarget.from_settings(settings),
        instance=settings.instance_id,
        presence_ttl=settings.presence_ttl,
        pool_size=settings.redis_publish_pool_size,
        display=settings.redis_display(),
        outbox_limit=settings.redis_outbox_limit,
        **queue,
    )


def make_audit_log(redis: Any | None) -> AuditLog:
    if redis is None:
        return MemoryAuditLog()
    from .audit import RedisAuditLog

    return RedisAuditLog(redis)


@dataclass(frozen=True, slots=True)
class Relaying:
    """One instance's relaying parts, wired: what ``create_app`` serves, and what in-process tests drive."""

    local: LocalConnections
    recent_logs: RecentLogs
    commands: CommandService
    relay: Relay
    recent: RecentCommands


def wire_relay(settings: Settings, broker: Broker) -> Relaying:
    """The registry, the recent-commands logs and reader, the command service and the relay on ``broker``."""
    local = LocalConnections(settings.instance_id)
    recent_logs = RecentLogs(settings, local)
    commands = CommandService(settings, broker, local, recent_logs)
    relay = Relay(settings, broker, local, recent_logs, commands)
    recent = RecentCommands(settings.instance_id, broker, recent_logs)
    commands.recent_event = recent.event  # Questions and answers about recent commands from other instances.
    return Relaying(local, recent_logs, commands, relay, recent)


def _grace_windows(store: TokenStore) -> dict[str, float]:
    """Open grace windows by token name, for wsbridge_token_grace_end_timestamp_seconds."""
    now = time.time()
    return {
        s.name: s.grace_ends for s in store.states.values() if s.grace_ends is not None and s.previous_accepted(now)
    }


def create_app(settings: Settings, broker: Broker | None = None, token_store: TokenStore | None = None) -> Litestar:
    """The app. ``token_store`` may come loaded (``wsbridge serve`` loads it to fail fast); else it is loaded here."""
    problems = settings.token_problems()
    if problems:
        raise ValueError("; ".join(problems))
    if token_store is None:
        token_store = make_token_store(settings)
        token_store.load()
    parts = wire_relay(settings, broker or make_broker(settings))
    relay = parts.relay
    metrics.watch(metrics.READY, lambda: 1.0 if relay.status()[0] else 0.0)
    redis = None
    if settings.redis_enabled:
        from .brokers.redis import RedisTarget

        # Audit trail and token notifications; the broker keeps its own connections.
        redis = RedisTarget.from_settings(settings).client(
            max_connections=32, socket_connect_timeout=2, socket_timeout=5
        )
    audit = make_audit_log(redis)
    notifier = None
    if redis is not None:
        from .tokens.notify import TokenNotifier

        notifier = TokenNotifier(redis)
    token_service = TokenService(
        settings, token_store, audit, local=parts.local, notifier=notifier, presence=relay.clients
    )
    store = token_store
    gate = Gate(settings, relay.broker)
    bans = BanService(gate, audit, parts.commands)
    # Every third of the presence TTL, as the Redis presence refresh: a missed beat shows long before expiry.
    heartbeat = Heartbeat(relay.instance, settings.presence_ttl / 3)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await relay.start()
        beating = asyncio.get_running_loop().create_task(heartbeat.run(relay.broker), name="heartbeat")
        await token_service.start()
        ban_watch = asyncio.get_running_loop().create_task(gate.watch(parts.local), name="ban-watch")
        metrics.set_build_info(__version__, relay.broker.name, relay.instance)
        metrics.TOKEN_GRACE_ENDS.source = lambda: _grace_windows(store)
        if settings.token_store == "env":  # Read once at start and never failing; the SSM store keeps its own.
            metrics.TOKEN_STORE_UP.set(1)
            metrics.TOKEN_LAST_REFRESH.set_to_current_time()
        log.info("Relay ready on broker %s as instance %s", relay.broker.describe(), relay.instance)
        try:
            async with mcp_lifespan(app):
                yield
        finally:
            ban_watch.cancel()
            beating.cancel()
            await token_service.stop()
            await relay.stop()
            if redis is not None:
                await redis.aclose()

    return Litestar(
        route_handlers=[relay_socket, *PROBE_HANDLERS, *API_HANDLERS, *BAN_HANDLERS, *EVENTS_HANDLERS, mcp_endpoint],
        # The admin dashboard under /admin (ui/); additionalProperties: false in the schema where msgspec forbids them.
        plugins=[DashboardPlugin(settings), StrictStructSchemaPlugin()],
        state=State(
            {
                "relay": relay,
                "commands": parts.commands,
                "recent": parts.recent,
                "events": EventFeed(relay),  # GET /api/v1/events and MCP listeners (records only while followed)
                "settings": settings,
                "audit": audit,
                "token_store": token_store,
                "token_service": token_service,
                "gate": gate,
                "bans": bans,
                "heartbeat": heartbeat,
            }
        ),
        lifespan=[lifespan],
        # The admission middleware refuses a larger Content-Length unread; this bounds chunked bodies too.
        request_max_body_size=max_request_bytes(settings),
        middleware=[metrics.http_metrics()],
        exception_handlers={ValidationException: validation_as_422, ApiError: api_error},
        openapi_config=OpenAPIConfig(
            title="WebSocket Bridge",
            version=__version__,
            description="HTTP API of the WebSocket Bridge relay. Authenticate with the X-Auth-Token header.",
            path="/schema",
            # The schema only (at /schema and /schema/openapi.json), no documentation UI: Litestar's UIs load
            # third-party scripts without SRI (Redoc from a mutable URL) on the dashboard's origin, outside the
            # dashboard's CSP, so such a script could read a CSRF token and act as a signed-in admin (#20).
            render_plugins=[JsonRenderPlugin()],
            # Declared so a generated client (an LLM tool definition) sends the header; /, /healthz,
            # /readyz and /metrics say they need none (api_schema.PublicOperation).
            components=Components(
                security_schemes={
                    "XAuthToken": SecurityScheme(type="apiKey", name="X-Auth-Token", security_scheme_in="header")
                }
            ),
            security=[{"XAuthToken": []}],
            operation_id_creator=camel_case_operation_id,  # Routes that name no operation_id: list_x -> listX.
        ),
        logging_config=None,
    )
