"""Request/reply for controllers: send a command, get *its* reply or a typed reason why not.

Two ways in, one result type and one error tree:

- :class:`Controller` speaks WebSocket protocol version 2 over a
  :class:`~appliance.client.BridgeClient`: each request carries an ``id`` and is
  answered by the reply frame naming it, whatever else arrives meanwhile;
- :class:`HttpController` uses ``POST /api/v1/commands`` with ``wait_ms``.

Errors (httpx style)::

    CommandError                 code, detail
    ├── ClientOffline            the target is not connected anywhere (404, target_offline)
    ├── ReplyTimeout             delivered or queued, but no reply in time (504, timeout)
    ├── RateLimited              retry after ``retry_after_ms`` (429)
    ├── MessageTooLarge          over the relay's ``limit`` in bytes (413)
    ├── InvalidCommand           the command itself is wrong (422, invalid_*)
    ├── QueueFull                the target's queue or reply line is full (409)
    ├── DuplicateId              this id is still in flight from this controller (409)
    └── DeliveryFailed           the relay cannot reach the target's instance now (503)

    BridgeClosed                 Controller only: the relay closed the connection for good (``code``: close code)
    └── IdTaken                  4010: another controller connected with this one's id, and holds it now

Every :class:`Controller` needs an id of its own (``llm-planner``, ``llm-critic``): two with
one id take it from each other, and the one replaced raises :class:`IdTaken` (naming the id)
from :meth:`Controller.request` and :meth:`Controller.receive` instead of waiting for replies
that now go to the other. Both are also ``appliance.client``'s, re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .client import BridgeClient, BridgeClosed, IdTaken

__all__ = [
    "BridgeClosed",
    "ClientOffline",
    "CommandError",
    "Controller",
    "DeliveryFailed",
    "DuplicateId",
    "HttpController",
    "IdTaken",
    "InvalidCommand",
    "MessageTooLarge",
    "QueueFull",
    "RateLimited",
    "Reply",
    "ReplyTimeout",
    "error_for",
]


class CommandError(Exception):
    """A command did not get a reply; ``code`` is the relay's error code, ``detail`` says why."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.extra = extra


class ClientOffline(CommandError):
    pass


class ReplyTimeout(CommandError):
    pass


class RateLimited(CommandError):
    @property
    def retry_after_ms(self) -> int | None:
        return self.extra.get("retry_after_ms")


class MessageTooLarge(CommandError):
    @property
    def limit(self) -> int | None:
        return self.extra.get("limit")


class InvalidCommand(CommandError):
    pass


class QueueFull(CommandError):
    pass


class DuplicateId(CommandError):
    pass


class DeliveryFailed(CommandError):
    pass


_ERRORS: dict[str, type[CommandError]] = {
    "target_offline": ClientOffline,
    "timeout": ReplyTimeout,
    "rate_limited": RateLimited,
    "too_many_keys": RateLimited,  # a new id beyond the caller's live keys: retry after retry_after_ms
    "message_too_large": MessageTooLarge,
    "invalid_json": InvalidCommand,
    "invalid_message": InvalidCommand,
    "invalid_target": InvalidCommand,
    "queue_full": QueueFull,
    "duplicate_id": DuplicateId,
    "delivery_failed": DeliveryFailed,
}


def error_for(frame: dict[str, Any]) -> CommandError:
    """The typed exception for an error frame or error body ``{"error", "detail", ...}``."""
    code = str(frame.get("error", "error"))
    extra = {k: v for k, v in frame.items() if k not in ("error", "detail")}
    return _ERRORS.get(code, CommandError)(code, str(frame.get("detail", "")), **extra)


@dataclass(frozen=True, slots=True)
class Reply:
    """A client's answer to one command."""

    id: str | int
    sender: str
    message: str
    rtt_ms: float


def _one_client(target: str) -> None:
    """request() waits for one client's reply: a broadcast has many, or none to wait for."""
    if target == "*" or target.startswith("group:"):
        raise InvalidCommand(
            "invalid_target",
            f"request() waits for one client's reply and {target!r} names many: "
            "broadcast with send() (WebSocket) or command() (HTTP), which report the count",
        )


#: Put in the queue of other frames when the connection ended for good: receive() raises the reason.
_ENDED: dict[str, Any] = {}


class Controller:
    """A controller connection that correlates replies by id (protocol version 2).

    Frames that answer no :meth:`request` (other clients' messages, status frames of
    :meth:`send` commands) are kept for :meth:`receive`, in order.
    """

    def __init__(self, url: str, controller_id: str, token: str, **client_options: Any) -> None:
        self.client = BridgeClient(url, controller_id, token, **client_options)
        self._waiters: dict[str | int, asyncio.Future[dict[str, Any]]] = {}
        self._other: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ended: Exception | None = None  # Why the connection ended for good, once it has.
        self._unacked: set[str | int] = set()  # requests with no frame from the relay yet
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)

    async def __aenter__(self) -> Controller:
        await self.client.connect()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.client.close()

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def _read(self) -> None:
        try:
            while True:
                frame = json.loads(await self.client.receive())
                key = frame.get("reply_to", frame.get("id")) if isinstance(frame, dict) else None
                if key is None and isinstance(frame, dict) and "error" in frame and len(self._unacked) == 1:
                    # An error the relay could not tie to an id (a frame too large to read, a rate
                    # limit): with one request unanswered it can only be about that one.
                    key = next(iter(self._unacked))
                if key is not None:
                    self._unacked.discard(key)
                waiter = self._waiters.get(key) if key is not None else None
                if waiter is None:
                    self._other.put_nowait(frame)
                # Status "delivered"/"queued" is progress, not an outcome: the request keeps waiting.
                elif frame.get("status") not in ("delivered", "queued") and not waiter.done():
                    waiter.set_result(frame)
        except Exception as exc:  # The connection ended for good: wake every waiter with the reason.
            self._ended = exc
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(exc)
            self._other.put_nowait(_ENDED)  # and a receive() that waits, or comes later
            raise

    async def send(self, target: str, message: str, **fields: Any) -> None:
        """Send without waiting (fields such as ``id``, ``queue``, ``timeout_ms`` pass through)."""
        await self.client.send_command(target, message, **fields)

    async def request(self, target: str, message: str, timeout: float = 10.0, *, queue: bool = False) -> Reply:
        """Send ``message`` to ``target`` and return that client's reply to it.

        Raises a :class:`CommandError` subclass: :class:`ClientOffline`, :class:`ReplyTimeout`, ...
        """
        _one_client(target)
        if self._ended is not None:
            raise self._ended
        command_id = self.new_id()
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[command_id] = waiter
        self._unacked.add(command_id)
        timeout_ms = max(1, round(timeout * 1000))
        try:
            fields: dict[str, Any] = {"id": command_id, "timeout_ms": timeout_ms}
            if queue:
                fields["queue"] = True
            await self.client.send_command(target, message, **fields)
            try:
                # The relay reports the timeout itself; the margin covers the trip back.
                async with asyncio.timeout(timeout + 5.0):
                    frame = await waiter
            except TimeoutError:
                raise ReplyTimeout("timeout", f"no reply from {target} within {timeout:g} s") from None
        finally:
            self._waiters.pop(command_id, None)
            self._unacked.discard(command_id)
        if "reply_to" in frame:
            return Reply(command_id, frame["sender"], frame["message"], frame["rtt_ms"])
        if frame.get("status") == "timeout":
            raise ReplyTimeout("timeout", f"{target} did not reply within {timeout:g} s", target=target)
        raise error_for(frame)

    async def receive(self) -> dict[str, Any]:
        """The next frame that answers no request; the reason once the connection ended for good."""
        frame = await self._other.get()
        if frame is _ENDED:
            self._other.put_nowait(_ENDED)  # for the next caller too
            assert self._ended is not None
            raise self._ended
        return frame


class HttpController:
    """Request/reply over the HTTP API (``POST /api/v1/commands``), for scripts and tool servers."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        base = base_url.rstrip("/")
        if base.startswith(("ws://", "wss://")):
            base = "http" + base[2:]
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base, headers={"X-Auth-Token": token}, timeout=timeout)

    def __repr__(self) -> str:  # Never show the token.
        return f"HttpController({str(self._http.base_url)!r})"

    async def __aenter__(self) -> HttpController:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def command(self, target: str, message: str, **fields: Any) -> dict[str, Any]:
        """``POST /api/v1/commands``: the decoded answer of a 2xx, else the typed error."""
        body = {"target": target, "message": message, **{k: v for k, v in fields.items() if v is not None}}
        wait_ms = body.get("wait_ms") or 0
        response = await self._http.post("/api/v1/commands", json=body, timeout=self._timeout + wait_ms / 1000)
        return _decode(response)

    async def request(
        self, target: str, message: str, timeout: float = 10.0, *, queue: bool = False, command_id: str | None = None
    ) -> Reply:
        """Send and wait for the reply, as :meth:`Controller.request` does."""
        _one_client(target)
        wait_ms = max(1, round(timeout * 1000))
        answer = await self.command(target, message, wait_ms=wait_ms, queue=queue or None, id=command_id)
        if answer.get("status") == "replied":
            return Reply(answer["id"], answer["sender"], answer["message"], answer["rtt_ms"])
        raise CommandError(str(answer.get("status")), f"unexpected answer {answer}")

    async def command_status(self, command_id: str, wait_ms: int | None = None) -> dict[str, Any]:
        """``GET /api/v1/commands/{id}``: what became of a command (its reply, even a late one)."""
        params = {"wait_ms": wait_ms} if wait_ms else {}
        response = await self._http.get(
            f"/api/v1/commands/{quote(command_id, safe='')}",
            params=params,
            timeout=self._timeout + (wait_ms or 0) / 1000,
        )
        return _decode(response)

    async def clients(self, **filters: Any) -> dict[str, Any]:
        """``GET /api/v1/clients`` with filters (``role``, ``group``, ``prefix``, ``limit``, ``cursor``)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return _decode(await self._http.get("/api/v1/clients", params=params))

    async def client(self, client_id: str) -> dict[str, Any] | None:
        """``GET /api/v1/clients/{id}`` (with its manifest, without history): the record, None when not connected."""
        response = await self._http.get(f"/api/v1/clients/{client_id}", params={"history_limit": 0})
        return None if response.status_code == 404 else _decode(response)


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = {"error": "http_error", "detail": response.text[:500]}
    if response.is_success:
        return data
    if response.status_code == 504:
        raise ReplyTimeout("timeout", data.get("detail", "no reply in time"), **_rest(data))
    if "error" in data:
        raise error_for(data)
    if response.status_code in (400, 422):  # Litestar's validation shape: {"status_code", "detail", "extra"}
        raise InvalidCommand("invalid_message", f"{data.get('detail')}: {data.get('extra')}")
    if response.status_code in (401, 403):
        raise CommandError("unauthorized", data.get("detail", "token not accepted"))
    raise CommandError("http_error", f"HTTP {response.status_code}: {data}")


def _rest(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("error", "detail")}
