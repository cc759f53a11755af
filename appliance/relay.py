"""The relay: this instance's connections glued to the pure core and a broker.

The WebSocket adapter (appliance/web.py) feeds frames to a connection's
:class:`~appliance.core.session.Session` and hands the resulting actions to
:meth:`Relay.perform`; the broker reaches local connections through the
:class:`~appliance.brokers.base.Inbox` methods. The relay claims and releases ids, keeps
the local-connections registry (appliance/registry.py) and hands commands with an id to
the command service through :class:`CommandHooks`, an interface it declares and the
service implements, so it never imports the layer above it. The HTTP API and the
dashboard read :meth:`Relay.clients`, :meth:`Relay.status` and :meth:`Relay.history`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from . import metrics
from .brokers.base import Broker, BrokerUnavailable, Owner
from .connections import ASGISend, Connection, Flusher
from .core.history import close_entry
from .core.manifest import ManifestBudget, encode_manifest_accepted, encode_manifest_error
from .core.protocol import CloseCode, Command, ErrorCode, Role
from .core.protocol_v2 import Request, TimeoutPolicy, encode_client_command
from .core.recent import cut
from .core.requests import Routed, V1Matcher
from .core.session import (
    Close,
    DeclareManifest,
    Deliver,
    Limits,
    Publish,
    ReplyOrPublish,
    SendError,
    Session,
    Submit,
)
from .core.timefmt import iso
from .recent_logs import RecentLogs
from .registry import LocalConnections
from .settings import Settings
from .tokens.base import Grant

__all__ = ["CommandHooks", "Relay"]

log = logging.getLogger(__name__)


class CommandHooks(Protocol):
    """What the relay asks of the command service (appliance/commands/), which implements it."""

    #: Version-1 clients' reply lines: the relay looks before handing a client's text over.
    matcher: V1Matcher

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(self, sender: str, controller: str, request: Request) -> None: ...

    #: Whether a controller connection's keyed commands wait for their ids' claims; ``after`` then
    #: runs a later command of that connection once they went (commands/idempotency.py).
    def holding(self, sender: str) -> bool: ...

    def after(self, sender: str, then: Callable[[], None]) -> None: ...

    def client_text(self, conn: Connection, text: str) -> bool: ...

    def hand_over(self, conn: Connection, routed: Routed, now: float) -> None: ...

    def instance_event(self, payload: bytes) -> None: ...

    def fan_in_remote(self, payload: bytes) -> None: ...

    def client_opened(self, conn: Connection) -> None: ...

    def client_closed(self, conn: Connection) -> None: ...

    def controller_closed(self, conn: Connection) -> None: ...


class Relay:
    """This instance's side of the cluster: claims, routing, the broker's inbox, shutdown."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        local: LocalConnections,
        recent_logs: RecentLogs,
        commands: CommandHooks,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.instance = settings.instance_id
        self.connections = local
        self.local = local.by_id  # The hot path's dict of holders by id (Inbox.deliver).
        self.commands = commands
        self.recent_logs = recent_logs
        #: The bytes of the manifests this instance keeps (each also in Redis presence): bounded in total.
        self.manifests = ManifestBudget()
        self.draining = False
        self._claiming: dict[str, tuple[asyncio.Lock, int]] = {}
        self._kicked: dict[str, float] = {}  # conn_keys replaced before they finished opening
        timeouts = TimeoutPolicy(settings.command_timeout_ms, settings.command_timeout_max_ms)
        self._limits = {
            Role.CLIENT: Limits(settings.max_message_bytes, settings.client_rate_limit, settings.client_rate_burst),
            Role.CONTROLLER: Limits(
                settings.max_message_bytes, settings.controller_rate_limit, settings.controller_rate_burst, timeouts
            ),
        }
        self.flusher = Flusher()  # The reader stamps received_at on it.
        metrics.FRAMES_SENT.source = local.frames_sent
        metrics.watch(metrics.SEND_QUEUE_MESSAGES_MAX, lambda: local.fullest_queue()[0])
        metrics.watch(metrics.SEND_QUEUE_BYTES_MAX, lambda: local.fullest_queue()[1])
        self._cleanups: set[asyncio.Task[None]] = set()
        self._recording = bool(settings.recent_commands_per_client)
        # The Inbox methods that are the registry's own, bound once.
        self.deliver_to_controllers = local.deliver_to_controllers
        self.presence_records = local.presence_records
        self.presence_summary = local.presence_summary
        self.presence_record = local.presence_record

    async def start(self) -> None:
        self.flusher.bind(asyncio.get_running_loop())
        await self.broker.start(self)
        self.commands.start()

    async def stop(self) -> None:
        await self.commands.stop()
        await self.broker.stop()
        self.flusher.bind(None)

    def new_connection(
        self,
        client_id: str,
        role: Role,
        send: ASGISend,
        remote: str,
        grant: Grant | None = None,
        *,
        v2: bool = False,
        groups: tuple[str, ...] = (),
    ) -> Connection:
        session = Session(client_id, role, self._limits[role], time.time(), v2=v2)
        settings = self.settings
        max_chars = (
            settings.controller_max_pending_bytes if role is Role.CONTROLLER else settings.client_max_pending_bytes
        )
        conn = Connection(
            session, send, remote, self.flusher, settings.max_pending_messages, max_chars, v2=v2, groups=groups
        )
        conn.grant = grant
        return conn

    # --- lifecycle of one connection ----------------------------------------------------

    async def open(self, conn: Connection) -> CloseCode | None:
        """Claim the connection's id cluster-wide and register it; a close code refuses it."""
        if self.draining:
            return CloseCode.GOING_AWAY
        client_id = conn.client_id
        # One claim per id at a time on this instance: a reconnect storm resolves in order.
        lock, users = self._claiming.get(client_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._claiming[client_id] = (lock, users + 1)
        try:
            async with lock:
                started = time.perf_counter()
                try:
                    claim = await self.broker.claim(
                        client_id,
                        self.instance,
                        conn.conn_key,
                        conn.role,
                        self.settings.duplicate_policy == "reject",
                    )
                except BrokerUnavailable as exc:
                    log.warning("Refusing %s: %s", client_id, exc)
                    return CloseCode.TRY_AGAIN_LATER
                finally:
                    metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
                if not claim.accepted:
                    return CloseCode.ROLE_CONFLICT if claim.role_conflict else CloseCode.DUPLICATE_REJECTED
                assert claim.owner is not None
                try:
                    refusal = self._register(conn, claim.owner, claim.previous)
                except BaseException:  # A bug after the claim must not leave the id held by nobody.
                    await self._release_surely(client_id, claim.owner)
                    raise
                if refusal is not None:
                    await self._release_surely(client_id, claim.owner)
                elif conn.role is Role.CLIENT:
                    self.commands.client_opened(conn)  # Commands queued while it was away go first.
                return refusal
        finally:
            lock, users = self._claiming[client_id]
            if users == 1:
                del self._claiming[client_id]
            else:
                self._claiming[client_id] = (lock, users - 1)

    def _register(self, conn: Connection, owner: Owner, previous: Owner | None) -> CloseCode | None:
        """The claim succeeded: make ``conn`` the local holder of its id, unless it lost meanwhile."""
        client_id = conn.client_id
        if previous is not None:
            self.replaced(client_id, previous)
        if self._kicked.pop(conn.conn_key, None) is not None:
            return CloseCode.REPLACED
        if self.draining:  # SIGTERM arrived during the claim: drain() has already run.
            return CloseCode.GOING_AWAY
        older = self.local.get(client_id)
        if older is not None:  # Claims for one id are serialized here, so this one is newer.
            self._close_replaced(older)
        if conn.role is Role.CLIENT:
            self.recent_logs.opened(conn, older)
        conn.owner = owner
        self.connections.add(conn)
        return None

    async def _release_surely(self, client_id: str, owner: Owner) -> None:
        """Release an id even if the caller is being cancelled: the release runs to its end."""
        task = asyncio.get_running_loop().create_task(self.broker.release(client_id, owner))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def close(self, conn: Connection) -> None:
        """The connection is gone: unregister it, and release its id unless a newer one holds it."""
        conn.session.closed()
        registered, holder = self.connections.remove(conn)
        if conn.manifest is not None:
            self.manifests.release(conn)
        if not registered:
            return
        if holder and conn.role is Role.CLIENT:
            self.commands.client_closed(conn)
            self.recent_logs.closed(conn)
        if conn.role is Role.CONTROLLER:
            self.commands.controller_closed(conn)
        if conn.owner is not None:
            await self._release_surely(conn.client_id, conn.owner)

    # --- actions from the core ---------------------------------------------------------

    def perform(self, conn: Connection, action: Any) -> None:
        """Carry out what the session decided about one received frame.

        Synchronous on purpose (no coroutine per frame); a :class:`Throttle` is the
        reader's to honour, since pausing the reader is what slows the peer down.
        """
        if type(action) is Deliver:
            if self.commands.holding(conn.conn_key):  # Behind its keyed commands (their ids are claimed first).
                self.commands.after(conn.conn_key, partial(self._deliver, conn, action.command))
            else:
                self._deliver(conn, action.command)
        elif type(action) is Publish:
            metrics.RECEIVED_FROM_CLIENTS.count += 1
            # Only v1 clients with a command in flight cost a look (their reply line).
            if self.commands.matcher.has_line(conn.client_id):
                self.commands.client_text(conn, action.text)
            self.broker.send_to_controllers(action.frame)
        elif type(action) is Submit:
            metrics.RECEIVED_FROM_CONTROLLERS.count += 1
            self.commands.submit(conn.conn_key, conn.session.client_id, action.request)
        elif type(action) is ReplyOrPublish:
            metrics.RECEIVED_FROM_CLIENTS.count += 1
            if not self.commands.client_text(conn, action.text):  # A reply_to answer goes to its sender only.
                self.broker.send_to_controllers(action.frame)
        elif type(action) is SendError:
            metrics.ERRORS.labels(code=action.code.value).inc()
            conn.deliver(action.frame)
        elif type(action) is Close:
            conn.close(action.code, action.reason)
        elif type(action) is DeclareManifest:
            self._declare_manifest(conn, action)

    def _declare_manifest(self, conn: Connection, action: DeclareManifest) -> None:
        """Keep a client's manifest with its connection and in presence (cluster-wide), and answer it."""
        if action.error is not None:
            log.info("%s sent a manifest that is refused: %s", conn.client_id, action.error.detail)
            conn.deliver(encode_manifest_error(action.error))
            return
        assert action.manifest is not None
        error = self.manifests.admit(conn, action.manifest)
        if error is not None:
            conn.deliver(encode_manifest_error(error))
            return
        conn.manifest = {**action.manifest, "updated_at": iso(time.time(), "seconds")}
        self.broker.presence_changed(conn.client_id)
        conn.deliver(encode_manifest_accepted(conn.manifest))

    def _deliver(self, conn: Connection, command: Command) -> None:
        metrics.RECEIVED_FROM_CONTROLLERS.count += 1

        def done(code: ErrorCode | None, detail: str) -> None:
            # Success needs no frame in protocol v1; status frames would go here.
            if code is not None:
                self.perform(conn, conn.session.delivery_failed(command, code, detail))

        self.broker.send(command.target, command.message, done, conn.client_id)

    # --- Inbox: what the broker hands us ---------------------------------------------------

    def deliver(self, client_id: str, text: str, sender: str = "") -> ErrorCode | None:
        conn = self.local.get(client_id)
        if conn is None:
            return ErrorCode.TARGET_OFFLINE
        if conn.session.role is Role.CONTROLLER:
            # Controllers send to clients only: raw text pushed into a controller could
            # forge another client's {"sender": ...} reply.
            return ErrorCode.TARGET_NOT_CLIENT
        if conn.deliver(encode_client_command(None, sender, text) if conn.v2 else text):
            recent = conn.recent
            if recent is None and self._recording:
                recent = self.recent_logs.log_for(conn)
            if recent is not None:
                # CommandLog.untracked, inlined on the version-1 hot path: the call cost as much as
                # the append (0.12 against 0.09 us a command in-process; a round trip costs ~20 us
                # of server CPU). Stamped and cut now, formatted only when somebody reads.
                recent.entries.append(
                    (time.time(), sender, None, text if len(text) <= recent.max_chars else cut(text, recent.max_chars))
                )
            return None
        return ErrorCode.DELIVERY_FAILED

    def deliver_routed(self, client_id: str, routed: Routed) -> ErrorCode | None:
        """A command with an id for a local client: the command service frames and tracks it."""
        conn = self.local.get(client_id)
        if conn is None:
            return ErrorCode.TARGET_OFFLINE
        if conn.session.role is Role.CONTROLLER:
            return ErrorCode.TARGET_NOT_CLIENT
        if conn.close_code is not None:
            return routed.closing_error
        self.commands.hand_over(conn, routed, time.time())
        return None

    def instance_event(self, payload: bytes) -> None:
        """An outcome or an order on this instance's channel."""
        self.commands.instance_event(payload)

    def fan_in(self, payload: bytes) -> None:
        """A broadcast or group command from any instance: deliver locally, report the count."""
        self.commands.fan_in_remote(payload)

    def replaced(self, client_id: str, owner: Owner) -> None:
        conn = self.connections.connection(owner.conn_key)
        if conn is not None and conn.owner == owner:
            self._close_replaced(conn)
            return
        if owner.instance == self.instance:
            now = time.monotonic()
            self._kicked[owner.conn_key] = now
            for key, at in list(self._kicked.items()):
                if now - at > 60:
                    del self._kicked[key]

    def _close_replaced(self, conn: Connection) -> None:
        if conn.close_code is None:  # The broker and the local check may both report it.
            metrics.CLOSED_BY_RELAY.labels(reason="replaced").inc()
            conn.close(CloseCode.REPLACED)

    # --- service interface for the HTTP API and the dashboard ----------------------------

    def record_close(self, conn: Connection, code: int | None, reason: str, by_relay: bool) -> None:
        """Add a connection that was open to its id's connect history (once, at close; never waits)."""
        if conn.owner is None:
            return  # Refused before it was registered: never connected.
        entry = close_entry(
            conn.presence_record(self.instance),
            connected_at=conn.session.connected_since,
            closed_at=time.time(),
            code=code,
            reason=reason,
            by_relay=by_relay,
        )
        try:
            self.broker.record_history(conn.client_id, entry)
        except Exception:  # History is best effort: a bug here must not keep the id from being released.
            log.exception("Could not record the connect history of %s", conn.client_id)

    async def history(self, client_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """``client_id``'s connect history, cluster-wide, newest first (raises BrokerUnavailable)."""
        return await self.broker.history(client_id, min(limit, self.settings.history_per_client))

    async def clients(self, *, ordered: bool = True) -> list[dict[str, Any]]:
        """Cluster presence, by id then instance; ``ordered=False`` skips the sort for callers that
        select their own page (the dashboard's table)."""
        records = await self.broker.presence()
        if not ordered:
            return records
        return sorted(records, key=lambda r: (r["id"], r["instance"]))

    async def client(self, client_id: str) -> dict[str, Any] | None:
        """The presence record of ``client_id`` wherever it is connected, with its manifest (raises BrokerUnavailable)."""
        return await self.broker.presence_of(client_id)

    async def cluster_summary(self) -> list[dict[str, Any]]:
        """Per instance: connection and message counters and a membership version (see Broker.presence_summary).

        A few small reads however many connections there are: what an idle dashboard polls.
        """
        return await self.broker.presence_summary()

    def status(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        return self.broker.health()

    async def drain(self, grace: float) -> None:
        """SIGTERM: refuse newcomers, close every socket with 1001 after its queued frames."""
        self.draining = True
        conns = self.connections.all()
        log.info("Shutting down: closing %d connections with 1001", len(conns))
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY)
        if conns:
            await asyncio.gather(*(c.flush(grace) for c in conns))
