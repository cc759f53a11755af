"""Token changes travel between instances over Redis pub/sub (channel ``wsb:tokens``).

A rotation or revocation publishes the token's name; every instance re-reads its
store at once instead of waiting for the refresh interval, and re-reads it too after
every (re)subscription, so a notification missed during a Redis outage is caught.
The message carries no value: the store (SSM) stays the only source of the tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["CHANNEL", "TokenNotifier"]

log = logging.getLogger(__name__)

CHANNEL = "wsb:tokens"


class TokenNotifier:
    """Publish token events and call back on every event from any instance (this one included)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def publish(self, name: str, event: str) -> None:
        try:
            await self.redis.publish(CHANNEL, json.dumps({"name": name, "event": event}))
        except (RedisError, OSError) as exc:
            # The refresh interval still brings the change to every instance.
            log.warning("Could not announce the %s of %s over Redis (%s)", event, name, type(exc).__name__)

    async def listen(self, on_event: Callable[[], Awaitable[object]]) -> None:
        """Run until cancelled: subscribe, and call ``on_event`` on each message and after each (re)subscription."""
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                delay = 0.1
                await on_event()  # Catch up on anything published while we were not subscribed.
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None:
                        await on_event()
            except (RedisError, OSError) as exc:
                log.debug("Token notifications unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
