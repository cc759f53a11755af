"""``GET /api/v1/events``: what controllers hear, as server-sent events, for callers without a WebSocket.

Each event is one message that reached the controllers (a client's unsolicited text, a late
reply, a reply to a broadcast): ``event: message``, ``data:`` the controllers' own
``{"sender", "message"}`` frame, and an ``id`` to resume from with ``Last-Event-ID``
(appliance/event_feed.py says how far back and how exactly). Filters: one client, or the
clients of one group. Authenticated like the other API routes (``X-Auth-Token``, controller
or admin token).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Request, get
from litestar.exceptions import TooManyRequestsException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from .api_schema import AUTH_ERRORS, ApiOperation, refuse_repeated_query
from .brokers.base import BrokerUnavailable
from .core.admission import address_key, parse_networks
from .core.protocol import CLIENT_ID_PATTERN
from .event_feed import MAX_FOLLOWERS_PER_ADDRESS, EventFeed, Gap
from .http_auth import require_token
from .relay import Relay

__all__ = ["EVENTS_HANDLERS"]

#: How long a remote sender's group membership is trusted before its presence record is read again.
GROUP_REFRESH_SECONDS = 2.0
#: What an EventSource waits before it reconnects (with Last-Event-ID).
RETRY_MS = 2000


class _GroupMembers:
    """Whether a sender is in one group: exact for this instance's clients, from its presence record otherwise.

    A remote sender's record is read once per ``GROUP_REFRESH_SECONDS`` (one small read, however
    many clients there are), so a new member is recognised at its first message.
    """

    #: Senders remembered per stream before the memory starts over.
    MAX_KNOWN = 10_000

    def __init__(self, relay: Relay, group: str) -> None:
        self.relay = relay
        self.group = group
        self.known: dict[str, tuple[bool, float]] = {}  # sender -> (member, read at)

    async def has(self, sender: str) -> bool:
        conn = self.relay.connections.local_client(sender)
        if conn is not None:
            return self.group in conn.groups
        now = time.monotonic()
        known = self.known.get(sender)
        if known is not None and now - known[1] < GROUP_REFRESH_SECONDS:
            return known[0]
        try:
            record = await self.relay.client(sender)
        except BrokerUnavailable:
            return known is not None and known[0]
        if record is None:  # Its presence is not written yet (or it left): asked again at its next message.
            return False
        member = self.group in (record.get("groups") or ())
        if len(self.known) >= self.MAX_KNOWN:
            self.known.clear()
        self.known[sender] = (member, now)
        return member


def _follower_address(request: Request[Any, Any, Any]) -> str | None:
    """The key the caller's streams are counted under (IPv6: its /64); None for LIMITS_EXEMPT_IPS."""
    address = request.client.host if request.client else "unknown"
    exempt = parse_networks(request.app.state.settings.limits_exempt_ips)
    try:
        if any(ipaddress.ip_address(address) in network for network in exempt):
            return None
    except ValueError:
        pass
    return address_key(address)


async def _stream(
    feed: EventFeed, relay: Relay, last_id: str | None, address: str | None, client: str | None, group: str | None
) -> AsyncIterator[ServerSentEventMessage]:
    members = _GroupMembers(relay, group) if group is not None else None
    # Registered here, where the finally below always releases it (a generator never started runs no finally).
    # A burst of requests may pass the handler's check together: the cap holds within that burst.
    follower = feed.follower(last_id, address, limited=False)  # Recording from here, before the stream opens.
    try:
        yield ServerSentEventMessage(comment="wsbridge events", retry=RETRY_MS, data=None)
        async for item in follower.events():
            if item is None:
                yield ServerSentEventMessage(comment="keep-alive", data=None)
            elif isinstance(item, Gap):
                yield ServerSentEventMessage(event="gap", data=json.dumps({"detail": item.detail}))
            elif (client is None or item.sender == client) and (members is None or await members.has(item.sender)):
                yield ServerSentEventMessage(event="message", id=item.id, data=item.frame)
    finally:
        follower.close()


_NAME = {"pattern": CLIENT_ID_PATTERN.pattern, "max_length": 50}


@get(
    "/api/v1/events",
    summary="Follow what clients say, as server-sent events",
    tags=["events"],
    media_type="text/event-stream",
    responses={
        200: ResponseSpec(
            str,
            description='text/event-stream: `event: message` with `data: {"sender", "message"}` (the frame '
            "WebSocket controllers get) and an `id` for Last-Event-ID; `event: gap` when events may be missing.",
            media_type="text/event-stream",
            generate_examples=False,
        )
    },
    # appliance/api_schema.py: what the OpenAPI document says beyond Litestar's inference.
    raises=[*AUTH_ERRORS, TooManyRequestsException],
    operation_class=ApiOperation,
    before_request=refuse_repeated_query,
)
async def follow_events(
    request: Request[Any, Any, Any],
    client: Annotated[str | None, Parameter(description="Only this client's messages.", **_NAME)] = None,
    group: Annotated[str | None, Parameter(description="Only messages of clients in this group.", **_NAME)] = None,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(
            name="Last-Event-ID",
            max_length=200,
            description="Resume after this event (EventSource sends it when it reconnects).",
        ),
    ] = None,
) -> ServerSentEvent:
    """Every message a client sends that reaches the controllers (unsolicited text, late replies, replies to
    broadcasts), from now on, or from ``Last-Event-ID`` while this instance still keeps it."""
    require_token(request, allow_controller=True)
    feed: EventFeed = request.app.state.events
    relay: Relay = request.app.state.relay
    address = _follower_address(request)
    if not feed.admits(address):
        raise TooManyRequestsException(
            f"this address already follows {MAX_FOLLOWERS_PER_ADDRESS} event streams on this instance: close one "
            "(an EventSource reconnects by itself; one per process is enough)",
            headers={"Retry-After": "5"},
        )
    return ServerSentEvent(_stream(feed, relay, last_event_id, address, client, group))


EVENTS_HANDLERS = [follow_events]
