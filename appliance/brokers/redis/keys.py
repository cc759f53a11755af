"""Every key and channel name the Redis broker uses (prefix ``wsb:``); see the package docstring."""

from __future__ import annotations

__all__ = [
    "CLIENT_CHANNEL",
    "CONTROLLERS",
    "FAN_CHANNEL",
    "GENERATION_KEY",
    "HISTORY_KEY",
    "INSTANCES_KEY",
    "INSTANCE_CHANNEL",
    "INSTANCE_KEY",
    "OWNER_KEY",
    "PREFIX",
    "QUEUE_KEY",
    "QUEUE_SEEN_KEY",
    "SUMMARY_KEY",
]

PREFIX = "wsb:"
CONTROLLERS = f"{PREFIX}controllers"
CLIENT_CHANNEL = f"{PREFIX}c:"
INSTANCE_CHANNEL = f"{PREFIX}i:"
FAN_CHANNEL = f"{PREFIX}fan"
QUEUE_KEY = f"{PREFIX}q:"
QUEUE_SEEN_KEY = f"{PREFIX}qd:"
OWNER_KEY = f"{PREFIX}owner:"
INSTANCE_KEY = f"{PREFIX}instance:"
HISTORY_KEY = f"{PREFIX}hist:"
SUMMARY_KEY = f"{PREFIX}summary:"
INSTANCES_KEY = f"{PREFIX}instances"
GENERATION_KEY = f"{PREFIX}generation"
