"""Prometheus metrics: one ``wsbridge_`` prefix, base units, no client ids as labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, disable_created_metrics, generate_latest

__all__ = [
    "BROKER_OUTBOX_FULL",
    "BROKER_TASK_ERRORS",
    "BROKER_UP",
    "BUILD",
    "CONNECTIONS",
    "ERRORS",
    "MESSAGES",
    "RECEIVED_FROM_CLIENTS",
    "RECEIVED_FROM_CONTROLLERS",
    "REFUSED",
    "REGISTRY",
    "THROTTLED",
    "TOKEN_EVICTIONS",
    "TOKEN_LAST_REFRESH",
    "TOKEN_REFRESH_FAILURES",
    "TOKEN_STORE_UP",
    "render",
]

disable_created_metrics()  # The _created series only add noise to every counter.

#: Our own registry, so the metrics of one app are not mixed with a library's defaults.
REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("wsbridge_connections", "Open WebSocket connections on this instance.", ["role"], registry=REGISTRY)
MESSAGES = Counter(
    "wsbridge_messages_received_total",
    "Messages received from connections, by sender role.",
    ["role"],
    registry=REGISTRY,
)
# Bound once: label lookups cost more than the increment on the hot path.
RECEIVED_FROM_CONTROLLERS = MESSAGES.labels(role="controller")
RECEIVED_FROM_CLIENTS = MESSAGES.labels(role="client")
ERRORS = Counter(
    "wsbridge_errors_total", "Error frames sent to controllers, by error code.", ["code"], registry=REGISTRY
)
REFUSED = Counter(
    "wsbridge_connections_closed_total",
    "Connections refused or closed by the relay, by reason (unauthorized, invalid_id, duplicate, replaced, ...).",
    ["reason"],
    registry=REGISTRY,
)
THROTTLED = Counter(
    "wsbridge_client_throttled_total", "Client messages delayed by the client rate limit.", registry=REGISTRY
)
BROKER_UP = Gauge("wsbridge_broker_up", "1 when the broker (Redis) is reachable.", registry=REGISTRY)
BROKER_TASK_ERRORS = Counter(
    "wsbridge_broker_task_errors_total",
    "Unexpected errors in the broker's background tasks (each one logged; the task carries on).",
    ["task"],
    registry=REGISTRY,
)
BROKER_OUTBOX_FULL = Counter(
    "wsbridge_broker_outbox_full_total",
    "Messages refused because too many were waiting to be published to Redis (REDIS_OUTBOX_LIMIT).",
    registry=REGISTRY,
)
BUILD = Info("wsbridge_build", "Version and broker of this instance.", registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)


# --- token store (appliance/tokens) -------------------------------------------------------------
TOKEN_STORE_UP = Gauge(
    "wsbridge_token_store_up",
    "1 when the last read of the token store succeeded (0: serving the last good tokens).",
    registry=REGISTRY,
)
TOKEN_REFRESH_FAILURES = Counter(
    "wsbridge_token_refresh_failures_total",
    "Failed token-store refreshes (the last good tokens were kept).",
    registry=REGISTRY,
)
TOKEN_LAST_REFRESH = Gauge(
    "wsbridge_token_last_refresh_timestamp_seconds",
    "When the token store was last read successfully.",
    registry=REGISTRY,
)
TOKEN_EVICTIONS = Counter(
    "wsbridge_token_evictions_total",
    "Connections closed because their token expired or was revoked (4011).",
    registry=REGISTRY,
)
