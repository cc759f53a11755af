"""An async Python client for the relay, for controllers and clients alike.

It speaks the wire contract of ``docs/protocol.md`` and reconnects by itself
with capped, jittered exponential backoff, except after close codes that say
retrying cannot help (bad token, invalid id, replaced by a newer connection);
those raise :class:`BridgeClosed`::

    async with BridgeClient("ws://127.0.0.1:8000", "LLM", token) as llm:
        await llm.send_command("unity_client_1", "MoveForward 10")
        reply = await llm.receive_json()   # {"sender": "unity_client_1", "message": ...}
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from .core.protocol import CloseCode
from .core.protocol_v2 import SUBPROTOCOL_V2

__all__ = ["FINAL_CLOSE_CODES", "BridgeClient", "BridgeClosed", "IdTaken"]

#: Close codes after which reconnecting cannot succeed.
FINAL_CLOSE_CODES = frozenset(
    {
        CloseCode.UNAUTHORIZED,
        CloseCode.INVALID_CLIENT_ID,
        CloseCode.RESERVED_ID,
        CloseCode.REPLACED,
        CloseCode.TOKEN_EXPIRED,  # the same token would be refused: a new one must come from the operator
        CloseCode.DISCONNECTED,  # an administrator decided; coming straight back would defeat it
        CloseCode.GROUP_NOT_ALLOWED,  # the token does not name the groups asked for: the same ask fails again
        CloseCode.BANNED,  # an administrator banned the id or address; coming back is refused until it is lifted
    }
)


#: A connection that stayed open this long resets the reconnect backoff.
STABLE_AFTER = 2.0


class BridgeClosed(Exception):
    """The relay closed the connection for good; ``code`` and ``reason`` say why."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed by the relay: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class IdTaken(BridgeClosed):
    """4010: another connection took this id (two controllers or two devices configured alike).

    Final, like every replacement: each controller and each device needs an id of its own.
    """

    def __init__(self, code: int | None, reason: str, client_id: str) -> None:
        super().__init__(code, reason)
        self.client_id = client_id
        self.args = (
            f"closed by the relay: {code} {reason}: another connection took the id {client_id!r}; "
            "give each controller and each device an id of its own",
        )


def _closed_for_good(code: int | None, reason: str, client_id: str) -> BridgeClosed:
    if code == CloseCode.REPLACED:
        return IdTaken(code, reason, client_id)
    return BridgeClosed(code, reason)


class BridgeClient:
    """One logical connection to the relay that survives restarts of the relay.

    One task may receive while another sends: after a drop, exactly one of them
    reconnects and the others continue on the new socket.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        token: str,
        *,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        open_timeout: float = 10.0,
        max_size: int | None = 16 * 1024 * 1024,
        v2: bool = False,
        groups: Sequence[str] = (),
    ) -> None:
        self.url = url.rstrip("/") + f"/ws/{client_id}" + (f"?groups={','.join(groups)}" if groups else "")
        #: Protocol version 2 (subprotocol ``wsbridge.v2``): commands arrive as ``{"id", "from", "message"}``.
        self.v2 = v2
        self.client_id = client_id
        self._token = token
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.max_size = max_size
        self._ws: ClientConnection | None = None
        self._lock = asyncio.Lock()  # Held while (re)connecting: one socket at a time.
        self._opening: asyncio.Future[None] | None = None  # The (re)connect under way, see _reopen.
        self._final: BridgeClosed | None = None  # Set once the relay closed us for good.
        self._closed = False
        self._delay = backoff_initial
        self._opened_at = 0.0
        self.connections = 0

    def __repr__(self) -> str:  # Never show the token.
        return f"BridgeClient({self.url!r})"

    async def __aenter__(self) -> BridgeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection, retrying transient failures when ``reconnect`` is on."""
        async with self._lock:
            if self._ws is None:
                await self._reopen(back_off=False)
                self._final = None  # An explicit connect after a final close starts afresh.

    async def _reopen(self, *, back_off: bool) -> None:
        """(Re)connect in a task of its own, which a caller's cancellation does not stop.

        ``asyncio.wait_for(client.receive(), 1)`` may time out while a reconnect is under
        way. Cancelling the handshake would abort a socket the relay may have accepted
        already, and a version-1 command written to it would be lost unread; so the
        reconnect goes on, and the next call takes its socket (or waits for it).
        """
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = asyncio.ensure_future(self._back_off_then_open(back_off))
            opening.add_done_callback(_consume_exception)  # Raised to the caller that awaits it, if any.
        await asyncio.shield(opening)

    async def _back_off_then_open(self, back_off: bool) -> None:
        if back_off:
            await self._back_off()
        await self._open()

    async def _open(self) -> None:
        """Connect with backoff; only ever called with ``_lock`` held, so one socket at a time."""
        while True:
            if self._closed:
                raise BridgeClosed(CloseCode.NORMAL, "closed by this client")
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"X-Auth-Token": self._token},
                    open_timeout=self.open_timeout,
                    max_size=self.max_size,
                    compression=None,
                    subprotocols=[Subprotocol(SUBPROTOCOL_V2)] if self.v2 else None,
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                if not self.reconnect or (isinstance(exc, InvalidStatus) and exc.response.status_code < 500):
                    raise
            else:
                if self._closed:  # close() ran while the handshake was under way.
                    await ws.close()
                    raise BridgeClosed(CloseCode.NORMAL, "closed by this client")
                self._ws = ws
                self.connections += 1
                self._opened_at = time.monotonic()
                return
            await self._back_off()

    async def _back_off(self) -> None:
        await asyncio.sleep(random.uniform(0, self._delay))  # Full jitter: spreads a reconnect storm.
        self._delay = min(self._delay * 2, self.backoff_max)

    async def _socket(self) -> ClientConnection:
        """The live socket, opening one if none is (one task opens it, the others wait for it)."""
        while True:
            if self._closed:
                raise BridgeClosed(CloseCode.NORMAL, "closed by this client")
            if self._final is not None:
                raise _closed_for_good(self._final.code, self._final.reason, self.client_id)  # A fresh one per task.
            if self._ws is not None:
                return self._ws
            async with self._lock:
                if self._ws is None and self._final is None:
                    await self._reopen(back_off=False)

    async def _handle_closed(self, ws: ClientConnection, exc: ConnectionClosed) -> None:
        """``ws`` failed under one task: reconnect once, however many tasks saw it fail.

        A reader and a writer see the same drop; if both reconnected, the second socket
        would replace the first (4010, which is final). The lock lets the first task in
        reconnect while the others wait, then find a new socket and simply retry on it.
        """
        async with self._lock:
            if self._final is not None:
                raise _closed_for_good(self._final.code, self._final.reason, self.client_id)
            if self._ws is not ws:  # Another task already replaced the failed socket.
                return
            self._ws = None
            received = exc.rcvd
            code, reason = (received.code, received.reason) if received else (None, "connection lost")
            if self._closed or not self.reconnect or code in FINAL_CLOSE_CODES:
                self._final = _closed_for_good(code, reason, self.client_id)
                raise self._final from exc
            # The relay refuses after accepting (1013, 4009, 1001), so a connection that did not
            # last is a failed attempt: back off; one that lasted starts the backoff afresh.
            if time.monotonic() - self._opened_at >= STABLE_AFTER:
                self._delay = self.backoff_initial
            await self._reopen(back_off=True)

    async def send_text(self, text: str) -> None:
        """Send a raw text frame (what a client sends back as its reply)."""
        while True:
            ws = await self._socket()
            try:
                await ws.send(text)
                return
            except ConnectionClosed as exc:
                await self._handle_closed(ws, exc)

    async def send_command(self, target: str, message: str, **extra: Any) -> None:
        """Controllers: ask the relay to deliver ``message`` to ``target``."""
        await self.send_text(json.dumps({"target": target, "message": message, **extra}))

    async def receive(self) -> str:
        """The next text frame; waits across reconnects."""
        while True:
            ws = await self._socket()
            try:
                frame = await ws.recv()
                return frame if isinstance(frame, str) else frame.decode()
            except ConnectionClosed as exc:
                await self._handle_closed(ws, exc)

    async def receive_json(self) -> dict[str, Any]:
        """The next frame parsed as JSON (controllers receive replies and error frames)."""
        return json.loads(await self.receive())

    async def close(self) -> None:
        self._closed = True
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._ws is not None:
            await self._ws.close()
            self._ws = None


def _consume_exception(opening: asyncio.Future[None]) -> None:
    """A reconnect whose every caller was cancelled: its error is not "never retrieved"."""
    if not opening.cancelled():
        opening.exception()
