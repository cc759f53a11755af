"""An async Python client for the relay, for controllers and clients alike.

It speaks the wire contract of ``docs/protocol.md`` and reconnects by itself
with capped, jittered exponential backoff, except after close codes that say
retrying cannot help (bad token, invalid id, replaced by a newer connection);
those raise :class:`BridgeClosed`::

    async with BridgeClient("ws://127.0.0.1:8000", "LLM", token) as llm:
        await llm.send_command("unity_client_1", "MoveForward 10")
        reply = await llm.receive_json()   # {"sender": "unity_client_1", "message": ...}

A device registers handlers and serves them; with ``v2=True`` it declares them to the relay
as its command manifest on every connect, so an LLM can list what it accepts::

    device = BridgeClient(url, "robot_1", client_token, v2=True)

    @device.on_command("MoveForward", "Moves forward", arguments={"distance": {"type": "number"}})
    async def move(distance: float) -> str:
        return f"moved {distance}"

    async with device:
        await device.serve()
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from .core.manifest import ManifestError, bind_arguments, manifest_frame, parse_manifest
from .core.protocol import CloseCode
from .core.protocol_v2 import SUBPROTOCOL_V2

__all__ = ["FINAL_CLOSE_CODES", "BridgeClient", "BridgeClosed", "Handler", "IdTaken"]

log = logging.getLogger(__name__)

#: A command handler: called with the command's arguments by name, typed as declared; returns the reply (None: none).
Handler = Callable[..., "str | None | Awaitable[str | None]"]


@dataclass(frozen=True, slots=True)
class _Registered:
    spec: dict[str, Any]  # one command of the manifest: name, description, arguments
    handler: Handler


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
        self._handlers: dict[str, _Registered] = {}  # by casefolded name, in registration order

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
                if self.v2 and self._handlers:
                    await self._declare(ws)
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

    # --- a device: handlers, its manifest, serving -------------------------------------------

    def register(
        self,
        name: str,
        handler: Handler,
        description: str = "",
        *,
        arguments: Mapping[str, Mapping[str, Any]] | None = None,
        required: Sequence[str] | None = None,
    ) -> None:
        """Run ``handler`` for the command ``name`` (one word, matched ignoring case) and declare it.

        ``arguments`` are the JSON Schemas of the words after the name, in order (``{"distance":
        {"type": "number", "description": "metres"}}``; types string, number, integer, boolean);
        all are required unless ``required`` names the first few. A last string argument takes
        the rest of the text. Raises ValueError when the declaration is not a valid manifest entry.
        """
        properties = {key: dict(schema) for key, schema in (arguments or {}).items()}
        spec = {
            "name": name,
            "description": description,
            "arguments": {
                "type": "object",
                "properties": properties,
                "required": list(properties if required is None else required),
            },
        }
        candidates = [r.spec for key, r in self._handlers.items() if key != name.casefold()]
        parsed = parse_manifest(manifest_frame([*candidates, spec]))
        if isinstance(parsed, ManifestError) or parsed is None:
            raise ValueError(f"command {name!r}: {parsed.detail if parsed else 'not a manifest'}")
        self._handlers[name.casefold()] = _Registered(parsed["commands"][-1], handler)

    def on_command(
        self,
        name: str,
        description: str = "",
        *,
        arguments: Mapping[str, Mapping[str, Any]] | None = None,
        required: Sequence[str] | None = None,
    ) -> Callable[[Handler], Handler]:
        """:meth:`register` as a decorator."""

        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, description, arguments=arguments, required=required)
            return handler

        return decorate

    def manifest(self) -> str:
        """The manifest frame of the registered handlers (sent on every version-2 connect)."""
        return manifest_frame([r.spec for r in self._handlers.values()])

    async def _declare(self, ws: ClientConnection) -> None:
        try:
            await ws.send(self.manifest())
        except ConnectionClosed:
            pass  # The reader sees the close and reconnects, which declares it again.

    async def serve(self) -> None:
        """Answer commands with the registered handlers until the relay closes the connection for good.

        Commands run one at a time, in order. A command nobody registered, or whose arguments do
        not fit, is answered with ``error: ...``, as is a handler that raises.
        """
        while True:
            text = await self.receive()
            command_id: Any = None
            if self.v2:
                frame = json.loads(text)
                if "message" not in frame:  # The relay's answer to the manifest.
                    if frame.get("type") == "manifest_error":
                        log.warning("The relay refused the manifest: %s", frame.get("detail"))
                    continue
                command_id, text = frame.get("id"), frame["message"]
            reply = await self._dispatch(text)
            if reply is None:
                continue
            if command_id is not None:
                reply = json.dumps({"reply_to": command_id, "message": reply})
            await self.send_text(reply)

    async def _dispatch(self, text: str) -> str | None:
        words = text.split()
        registered = self._handlers.get(words[0].casefold()) if words else None
        if registered is None:
            return f"error: unknown command {words[0] if words else '(empty)'}"
        arguments = bind_arguments(registered.spec, words[1:])
        if isinstance(arguments, ManifestError):
            return f"error: {arguments.detail}"
        try:
            reply = registered.handler(**arguments)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as exc:
            log.exception("Handler of %s failed", registered.spec["name"])
            return f"error: {registered.spec['name']}: {exc}"
        return None if reply is None else str(reply)

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
