"""Prometheus metrics: one ``wsbridge_`` prefix, base units, bounded labels (never a client id).

Every metric of the appliance is declared here, once, with its help text, labels and
buckets, except the guards' own, declared next to the one place that counts them, on
this module's ``REGISTRY``: ``wsbridge_admission_refused_total`` and
``wsbridge_address_cooldowns_total`` (appliance/admission.py),
``wsbridge_handshake_timeouts_total`` (appliance/handshake_guard.py),
``wsbridge_forwarded_for_refused_total`` (appliance/forwarded.py) and
``wsbridge_log_lines_suppressed_total`` (appliance/logflood.py). ``monitoring/rules/`` and
the Grafana dashboards use these names and
``monitoring/runbook.md`` explains them. The hot path never looks a label up: each
labelled series it touches is bound once below (``FRAMES_SENT.client``,
``CLOSED_BY_PEER[code]``), so counting a frame is one attribute access and one ``inc``;
the series counted once or more per message are :class:`Tally` objects (a plain int
folded in at scrape time) or a :class:`FastHistogram`, so they take no lock at all.

Scrape-time values (queue depths, outbox depth, seconds since a refresh) are gauges
with a callback (:func:`watch`), computed when Prometheus asks rather than on every
message.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, ClassVar

from litestar.enums import ScopeType
from litestar.plugins.prometheus import PrometheusConfig, PrometheusMiddleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .core.protocol import CONNECTION_ROLES, CloseCode, ErrorCode

__all__ = [
    "BROKER_OUTBOX_FULL",
    "BROKER_TASK_ERRORS",
    "BROKER_UP",
    "BUILD",
    "CLAIM_SECONDS",
    "CLOSES",
    "CLOSE_CODE_LABELS",
    "COMMAND_OUTCOMES",
    "COMMAND_RTT",
    "CONNECTIONS",
    "DELIVERED",
    "ERRORS",
    "FRAMES_SENT",
    "MESSAGES",
    "OFFLINE_QUEUE",
    "OPENED",
    "PENDING_REQUESTS",
    "PUBLISH_SECONDS",
    "READY",
    "RECEIVED_FROM_CLIENTS",
    "RECEIVED_FROM_CONTROLLERS",
    "REDIS_OUTAGES",
    "REDIS_OUTBOX",
    "REDIS_RECONNECTS",
    "CLOSED_BY_RELAY",
    "REGISTRY",
    "REPLIED",
    "RELAY_SECONDS",
    "REPLY_SECONDS",
    "SEND_QUEUE_BYTES_MAX",
    "SEND_QUEUE_MESSAGES_MAX",
    "THROTTLED",
    "TOKEN_EVICTIONS",
    "TOKEN_GRACE_ENDS",
    "TOKEN_LAST_REFRESH",
    "TOKEN_REFRESH_FAILURES",
    "TOKEN_STORE_UP",
    "ByRole",
    "FastHistogram",
    "ScrapedCounter",
    "ScrapedGauge",
    "Tally",
    "close_label",
    "counter_total",
    "http_metrics",
    "record_close",
    "render",
    "set_build_info",
    "watch",
]

disable_created_metrics()  # The _created series only add noise to every counter.

#: Our own registry, so the metrics of one app are not mixed with a library's defaults.
REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, memory, open files, start time) on our registry: the default registry is not served.
ProcessCollector(registry=REGISTRY)

ROLES = tuple(role.value for role in CONNECTION_ROLES)


class Tally:
    """One counter series counted in a plain int on the hot path, added to its child when scraped.

    A prometheus-client ``inc`` takes a lock and checks its arguments (about 0.3 µs, several
    per command with an id); ``tally.count += 1`` is one attribute store. :func:`render`
    folds every tally into its series first, so a scrape sees every increment made before
    it. Increments and scrapes both run on the event loop's thread.
    """

    __slots__ = ("child", "count")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.count = 0
        _TALLIES.append(self)

    def inc(self, amount: int = 1) -> None:
        """As a prometheus child's ``inc`` (hot paths write ``tally.count += 1`` instead)."""
        self.count += amount

    def fold(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self.child.inc(count)


_TALLIES: list[Tally] = []


class FastHistogram(Collector):
    """A histogram without labels whose ``observe`` is a bisect and two additions, no lock.

    Exposed exactly as prometheus-client's ``Histogram`` (same bucket, count and sum
    samples); for series observed once per command. Observed on the event loop's thread.
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = [*buckets, math.inf]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value, as prometheus-client's "le" buckets.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self):
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([], buckets, self._sum)
        yield family

    def counts(self) -> tuple[list[float], tuple[int, ...]]:
        """(upper bounds with +Inf, per-bucket counts so far): read by the heartbeat, not per message."""
        return self._bounds, tuple(self._counts)


class ByRole:
    """The two role-labelled children of a metric, bound once (``m.controller.inc()``)."""

    __slots__ = ("controller", "client")

    def __init__(self, metric: Counter | Gauge) -> None:
        self.controller = metric.labels(role="controller")
        self.client = metric.labels(role="client")

    def __getitem__(self, role: str):  # For code that holds the role as a string (Role.value).
        return self.controller if role == "controller" else self.client


# --- connections --------------------------------------------------------------------------

CONNECTIONS = Gauge("wsbridge_connections", "Open WebSocket connections on this instance.", ["role"], registry=REGISTRY)
OPENED = ByRole(
    Counter(
        "wsbridge_connections_opened_total",
        "WebSocket connections accepted (authorized and registered), by role.",
        ["role"],
        registry=REGISTRY,
    )
)
CLOSED_BY_RELAY = Counter(
    "wsbridge_connections_closed_total",
    "Connections refused or closed by the relay, by reason (unauthorized, invalid_id, duplicate, replaced, ...).",
    ["reason"],
    registry=REGISTRY,
)

#: Close codes counted by their number: RFC 6455 §7.4.1's and the relay's own (CloseCode,
#: documented in docs/protocol.md). Anything else (a peer's private code) is "other", so a
#: misbehaving peer cannot create series.
CLOSE_CODE_LABELS = frozenset(
    {"1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1011", "1012", "1013"}
    | {str(int(code)) for code in CloseCode if int(code) >= 4000}
)
CLOSES = Counter(
    "wsbridge_closes_total",
    "Closed WebSocket connections by close code and by who closed first: relay (this appliance) or peer.",
    ["code", "by"],
    registry=REGISTRY,
)
_closes_bound: dict[tuple[int | None, bool], Any] = {}


def close_label(code: int | None) -> str:
    """The bounded label of a close code (1005 when the peer sent none, ``other`` if unknown)."""
    text = "1005" if code is None else str(int(code))
    return text if text in CLOSE_CODE_LABELS else "other"


def record_close(code: int | None, by_relay: bool) -> None:
    """Count one closed connection (once per connection, when it is unregistered)."""
    child = _closes_bound.get((code, by_relay))
    if child is None:
        child = CLOSES.labels(code=close_label(code), by="relay" if by_relay else "peer")
        if len(_closes_bound) < 256:  # Bounded cache: a peer's odd codes map to "other" anyway.
            _closes_bound[code, by_relay] = child
    child.inc()


# --- messages -----------------------------------------------------------------------------

MESSAGES = Counter(
    "wsbridge_messages_received_total",
    "Messages received from connections, by sender role.",
    ["role"],
    registry=REGISTRY,
)
# Counted per message: plain ints (Tally), folded when scraped.
RECEIVED_FROM_CONTROLLERS = Tally(MESSAGES.labels(role="controller"))
RECEIVED_FROM_CLIENTS = Tally(MESSAGES.labels(role="client"))


class ScrapedCounter(Collector):
    """A counter by role summed at scrape time from counts the relay keeps anyway.

    Frames sent are the hottest path of all (a fan-out writes one per client); the
    sessions already count them (``messages_out``), so the relay reports the sums and
    the send path pays nothing for the metric.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.source: Callable[[], dict[str, float]] = lambda: dict.fromkeys(ROLES, 0.0)
        REGISTRY.register(self)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=["role"])

    def describe(self):
        yield self._family()

    def collect(self):
        family = self._family()
        for role, count in self.source().items():
            family.add_metric([role], count)
        yield family


FRAMES_SENT = ScrapedCounter(
    "wsbridge_frames_sent_total", "Text frames written to connections, by the receiving connection's role."
)
ERRORS = Counter(
    "wsbridge_errors_total", "Error frames sent to controllers, by error code.", ["code"], registry=REGISTRY
)
for _code in ErrorCode:  # Every documented code starts at 0: a rate, not "no data", before the first error.
    ERRORS.labels(code=_code.value)
THROTTLED = Counter(
    "wsbridge_client_throttled_total", "Client messages delayed by the client rate limit.", registry=REGISTRY
)

#: Round trips are human- and device-scale: a millisecond to half a minute.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Time inside the appliance is CPU-scale: 50 µs to a second.
INTERNAL_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Observed once per client message and once per loop pass: lock-free, like REPLY_SECONDS.
COMMAND_RTT = FastHistogram(
    "wsbridge_command_rtt_seconds",
    "Command round trip seen at the client's instance: command queued for a client until that client's next message.",
    RTT_BUCKETS,
)
RELAY_SECONDS = FastHistogram(
    "wsbridge_relay_seconds",
    "Time inside the appliance from receiving a frame to writing what it caused (one sample per event-loop pass).",
    INTERNAL_BUCKETS,
)

# --- queues -------------------------------------------------------------------------------

SEND_QUEUE_MESSAGES_MAX = Gauge(
    "wsbridge_send_queue_messages_max",
    "Frames waiting in the fullest per-connection send queue (4008 slow_consumer closes it at its limit).",
    registry=REGISTRY,
)
SEND_QUEUE_BYTES_MAX = Gauge(
    "wsbridge_send_queue_bytes_max",
    "UTF-8 bytes waiting in the fullest per-connection send queue.",
    registry=REGISTRY,
)
REDIS_OUTBOX = Gauge("wsbridge_redis_outbox_messages", "Messages waiting to be published to Redis.", registry=REGISTRY)

# --- broker -------------------------------------------------------------------------------

BROKER_UP = Gauge(
    "wsbridge_broker_up",
    "1 when the broker (Redis) is reachable; set by the broker on every change.",
    registry=REGISTRY,
)
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
READY = Gauge(
    "wsbridge_ready",
    "1 when this instance answers /readyz with 200 (broker reachable, not shutting down).",
    registry=REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "wsbridge_redis_publish_seconds",
    "Time for one pipeline of publishes to Redis to return (one sample per batch of up to 512 messages).",
    buckets=INTERNAL_BUCKETS,
    registry=REGISTRY,
)
REDIS_OUTAGES = Counter(
    "wsbridge_redis_outages_total", "Times this instance lost Redis (reachable to unreachable).", registry=REGISTRY
)
REDIS_RECONNECTS = Counter(
    "wsbridge_redis_reconnects_total",
    "Times this instance got Redis back after an outage (resubscribed and re-registered its ids).",
    registry=REGISTRY,
)
CLAIM_SECONDS = Histogram(
    "wsbridge_claim_seconds",
    "Time to claim a connection's id cluster-wide (the broker's part of the handshake).",
    buckets=(*INTERNAL_BUCKETS, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

# --- controller API (request/reply, offline queue) -------------------------------------------
# The command service (appliance/commands/) increments these.

COMMAND_OUTCOMES = Counter(
    "wsbridge_command_outcomes_total",
    "Outcomes of commands with an id sent from this instance (delivered, queued, replied, timeout, or an error code).",
    ["outcome"],
    registry=REGISTRY,
)
#: Known values start at 0, so rate() and the timeout-ratio alert work before the first event.
COMMAND_OUTCOME_VALUES = ("delivered", "queued", "replied", "timeout")
for _outcome in COMMAND_OUTCOME_VALUES:
    COMMAND_OUTCOMES.labels(outcome=_outcome)
#: Counted per command: plain ints, folded when scraped.
DELIVERED = Tally(COMMAND_OUTCOMES.labels(outcome="delivered"))
REPLIED = Tally(COMMAND_OUTCOMES.labels(outcome="replied"))
REPLY_SECONDS = FastHistogram(
    "wsbridge_reply_seconds",
    "Round-trip time from a command with an id to its client's reply, measured on the sender's instance.",
    RTT_BUCKETS,
)
PENDING_REQUESTS = Gauge(
    "wsbridge_pending_requests", "Commands with an id waiting for their reply or timeout.", registry=REGISTRY
)
OFFLINE_QUEUE = Gauge(
    "wsbridge_offline_queue_messages",
    "Commands queued for clients that are not connected (this instance's view).",
    registry=REGISTRY,
)

# --- token store ------------------------------------------------------------------------------
# Names shared with the token-store branch (appliance/tokens/ sets them).

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


class ScrapedGauge(Collector):
    """A gauge by one label, read when scraped from state its owner keeps anyway (no series when empty)."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.source: Callable[[], dict[str, float]] = dict
        REGISTRY.register(self)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=[self.label])

    def describe(self):
        yield self._family()

    def collect(self):
        family = self._family()
        for value, number in self.source().items():
            family.add_metric([value], number)
        yield family


TOKEN_GRACE_ENDS = ScrapedGauge(
    "wsbridge_token_grace_end_timestamp_seconds",
    "Unix time the grace window of a rotated token ends, while one is open (by token name).",
    "name",
)

# --- build ------------------------------------------------------------------------------------

BUILD = Info("wsbridge_build", "Version, broker and instance id of this instance.", registry=REGISTRY)


def set_build_info(version: str, broker: str, instance: str) -> None:
    BUILD.info({"version": version, "broker": broker, "instance": instance})


def watch(gauge: Gauge, value: Callable[[], float]) -> None:
    """Compute ``gauge`` when scraped (queue depths): nothing on the hot path."""
    gauge.set_function(value)


class _Children:
    """A metric whose ``labels()`` children are remembered by their values (4 lookups per request).

    prometheus_client's ``labels()`` takes a lock and converts every value each time; the
    label values here are few (route templates, methods, statuses of matched routes).
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[Any, ...], Any] = {}

    def labels(self, *values: Any) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


#: The label names of the HTTP series (Litestar's, in its order); the factories below read only the keys.
_HTTP_LABELS: dict[str, Any] = dict.fromkeys(("method", "path", "status_code", "app_name"))


class _HttpMetrics(PrometheusMiddleware):
    """Litestar's HTTP metrics, registered on our registry instead of the global default one.

    ``__call__`` records the same series with the same labels as Litestar's, without what
    that one builds per request (a ``Request``, two label dicts, a ``functools.wraps`` copy,
    a second scope check): it cost 16 us of the 56 us a ``/healthz`` request takes.
    """

    _metrics: ClassVar[dict[str, Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Only HTTP scopes reach here (the config's scopes); no excluded methods, extra labels or exemplars.
        labels = _HTTP_LABELS
        method, path, app_name = scope["method"], scope["path_template"], self._config.app_name
        in_progress = self.requests_in_progress(labels).labels(method, path, 200, app_name)
        span = _Span(send)
        in_progress.inc()
        try:
            await self.app(scope, receive, span.send)
        finally:
            in_progress.dec()
            status = span.status_code
            if status >= 500:
                self.requests_error_count(labels).labels(method, path, status, app_name).inc()
            self.request_count(labels).labels(method, path, status, app_name).inc()
            self.request_time(labels).labels(method, path, status, app_name).observe(span.duration)

    def _metric(self, kind: type, suffix: str, doc: str, labels: dict[str, Any], **extra: Any) -> Any:
        name = f"{self._config.prefix}_{suffix}"
        if name not in _HttpMetrics._metrics:
            _HttpMetrics._metrics[name] = _Children(kind(name, doc, [*labels], registry=REGISTRY, **extra))
        return _HttpMetrics._metrics[name]

    def request_count(self, labels: dict[str, Any]) -> Counter:
        return self._metric(Counter, "requests_total", "HTTP requests, by route template and status.", labels)

    def request_time(self, labels: dict[str, Any]) -> Histogram:
        return self._metric(
            Histogram, "request_duration_seconds", "HTTP request duration, by route template.", labels, **self._kwargs
        )

    def requests_in_progress(self, labels: dict[str, Any]) -> Gauge:
        return self._metric(Gauge, "requests_in_progress", "HTTP requests being served.", labels)

    def requests_error_count(self, labels: dict[str, Any]) -> Counter:
        return self._metric(Counter, "requests_error_total", "HTTP requests answered with a 5xx status.", labels)


class _Span:
    """One request's status and duration, as Litestar's ``wrapped_send`` records them."""

    __slots__ = ("_send", "duration", "start", "status_code")

    def __init__(self, send: Any) -> None:
        self._send = send
        self.start = time.perf_counter()
        self.status_code = 200
        self.duration = 0.0

    async def send(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status_code = message["status"]
        elif kind == "http.response.body":
            self.duration = time.perf_counter() - self.start
        await self._send(message)


def http_metrics() -> Any:
    """Middleware for ``wsbridge_http_*``: HTTP only (WebSockets have their own metrics), by route template.

    Litestar runs middleware only for matched routes, so a scanner's 404s create no series.
    """
    config = PrometheusConfig(
        app_name="wsbridge",
        prefix="wsbridge_http",
        group_path=True,
        scopes={ScopeType.HTTP},
        middleware_class=_HttpMetrics,
        buckets=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
    )
    return config.middleware


def counter_total(metric: Counter | Gauge, *tallies: Tally, **labels: str) -> float:
    """A counter's (or gauge's) sum over its series matching ``labels`` now, with what ``tallies``
    hold unfolded. Read once per heartbeat (appliance/heartbeat.py), never on the message path."""
    total = sum(
        s.value
        for family in metric.collect()
        for s in family.samples
        if all(s.labels.get(k) == v for k, v in labels.items())
    )
    return total + sum(t.count for t in tallies)


def render() -> bytes:
    for tally in _TALLIES:
        tally.fold()
    return generate_latest(REGISTRY)
