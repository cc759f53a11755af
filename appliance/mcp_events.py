"""MCP callers hear clients too: a resource per client's messages, and change notifications on /mcp.

``wsbridge://clients/{client_id}/messages`` reads the messages that client sent to the
controllers recently (the event feed's buffer on the instance that answers; appliance/event_feed.py).
A caller that opens ``subscriptions/listen`` (MCP 2026-07-28; the listen request's response is the
stream, so it works on stateless /mcp behind any replica) with that URI among its
``resourceSubscriptions`` gets ``notifications/resources/updated`` each time the client speaks,
and reads the resource for the text. Every instance hears every client's messages, so the
replica that holds the listen stream notifies it wherever the client is connected.

The older ``resources/subscribe`` needs a session's standing stream, which stateless /mcp does
not keep: it is not offered. Over stdio (``wsbridge mcp``) neither is: that process has no feed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import ResourceUpdated, ServerEvent
from pydantic import Field

from .event_feed import EventFeed, FeedEvent

__all__ = ["MESSAGES_URI", "FeedBus", "add_messages_resource", "messages_uri"]

log = logging.getLogger(__name__)

MESSAGES_URI = "wsbridge://clients/{client_id}/messages"
#: Messages a read of the resource returns at most (the newest).
READ_LIMIT = 100


def messages_uri(client_id: str) -> str:
    return MESSAGES_URI.replace("{client_id}", client_id)


class FeedBus:
    """The MCP SDK's subscription bus (``SubscriptionBus``) on this instance's event feed.

    The feed records only while a listen stream is open here (and for its retention after).
    """

    def __init__(self, feed: EventFeed) -> None:
        self.feed = feed
        self._listeners: dict[object, Callable[[ServerEvent], None]] = {}
        self._unlisten: Callable[[], None] | None = None

    async def publish(self, event: ServerEvent) -> None:
        self._fan(event)

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        token = object()
        self._listeners[token] = listener
        if self._unlisten is None:
            self._unlisten = self.feed.listen(self._spoke)

        def unsubscribe() -> None:
            if self._listeners.pop(token, None) is not None and not self._listeners and self._unlisten is not None:
                self._unlisten()
                self._unlisten = None

        return unsubscribe

    def _spoke(self, event: FeedEvent) -> None:
        if event.sender:
            self._fan(ResourceUpdated(uri=messages_uri(event.sender)))

    def _fan(self, event: ServerEvent) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(event)
            except Exception:
                log.exception("An MCP listen stream failed to take an event")


def add_messages_resource(server: MCPServer, feed: EventFeed) -> None:
    """Register the per-client messages resource on ``server``."""

    @server.resource(
        MESSAGES_URI,
        name="client_messages",
        title="A client's recent messages",
        description="Messages this client sent to the controllers recently (unsolicited text, late replies, "
        "replies to broadcasts), oldest first, as {sender, message, at, id}. Kept while somebody listens: "
        "open subscriptions/listen with this URI to be told (notifications/resources/updated) when it speaks.",
        mime_type="application/json",
    )
    async def client_messages(
        client_id: Annotated[str, Field(description="The client id, as list_clients lists it.")],
    ) -> str:
        messages: list[dict[str, Any]] = []
        for event in feed.recent(client_id, READ_LIMIT):
            frame = json.loads(event.frame)
            messages.append({"id": event.id, "at": round(event.at, 3), **frame})
        return json.dumps({"client": client_id, "recording": feed.recording, "messages": messages})
