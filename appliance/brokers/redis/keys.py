"""Every key and channel name the Redis broker uses (prefix ``wsb:``); see the package docstring.

The constants are the names on one Redis; :class:`Keys` builds them, hash-tagged on a Cluster.
"""

from __future__ import annotations

__all__ = [
    "CLIENT_CHANNEL",
    "CONTROLLERS",
    "FAN_CHANNEL",
    "GENERATION_KEY",
    "HISTORY_INDEX_KEY",
    "HISTORY_KEY",
    "RECORDS_KEY",
    "RECORD_TIMES_KEY",
    "IDEMPOTENCY_COST_KEY",
    "IDEMPOTENCY_INDEX_KEY",
    "IDEMPOTENCY_KEY",
    "INSTANCES_KEY",
    "INSTANCE_CHANNEL",
    "INSTANCE_KEY",
    "Keys",
    "OWNER_KEY",
    "PREFIX",
    "QUEUE_KEY",
    "QUEUE_SEEN_KEY",
    "SERIES_KEY",
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
IDEMPOTENCY_KEY = f"{PREFIX}idem:"
#: A caller's live idempotency keys by expiry (sorted set) and the bytes each counts (hash; "" the total).
IDEMPOTENCY_INDEX_KEY = f"{PREFIX}idem-at:"
IDEMPOTENCY_COST_KEY = f"{PREFIX}idem-size:"
SUMMARY_KEY = f"{PREFIX}summary:"
#: Command records (appliance/commands/followup.py): a hash per owner, and its keys by last write.
RECORDS_KEY = f"{PREFIX}cmd:"
RECORD_TIMES_KEY = f"{PREFIX}cmd-at:"
#: Hash per instance: its clients' command manifests (kept out of the presence records every listing reads).
MANIFEST_KEY = f"{PREFIX}manifest:"
#: An instance's trend points (appliance/heartbeat.py), a capped list with its summary's TTL.
SERIES_KEY = f"{PREFIX}series:"
INSTANCES_KEY = f"{PREFIX}instances"
GENERATION_KEY = f"{PREFIX}generation"
#: Sorted set of the ids with a connect history, scored by their latest entry's time: the oldest go first.
HISTORY_INDEX_KEY = f"{PREFIX}hist-ids"


class Keys:
    """The names of one deployment: as above on one Redis (or Sentinel), hash-tagged on a Cluster.

    On a Cluster every name of one id carries ``{id}`` and every name of one instance
    ``{instance}``: an id's channel, owner, queue, delivered marks and history live in
    one slot (so the claim and enqueue scripts touch one shard), as do an instance's
    channel, presence and summary. Ids and instance names contain no braces. An owner's command
    records and their index carry ``{owner}`` (braces in the name replaced), as do a caller's
    idempotency records, their index and their sizes.
    """

    __slots__ = ("_left", "_right", "_client_prefix", "_client_suffix", "tagged")

    def __init__(self, *, tagged: bool = False) -> None:
        self.tagged = tagged
        self._left, self._right = ("{", "}") if tagged else ("", "")
        self._client_prefix = len(CLIENT_CHANNEL) + len(self._left)
        self._client_suffix = len(self._right)

    def _of(self, prefix: str, name: str) -> str:
        return f"{prefix}{self._left}{name}{self._right}"

    def client_channel(self, client_id: str) -> str:
        return self._of(CLIENT_CHANNEL, client_id)

    def client_of(self, channel: bytes) -> str:
        """The id whose channel ``channel`` is."""
        return channel[self._client_prefix : len(channel) - self._client_suffix].decode()

    def instance_channel(self, instance: str) -> str:
        return self._of(INSTANCE_CHANNEL, instance)

    def owner(self, client_id: str) -> str:
        return self._of(OWNER_KEY, client_id)

    def queue(self, client_id: str) -> str:
        return self._of(QUEUE_KEY, client_id)

    def queue_seen(self, client_id: str, controller: str, command: str) -> str:
        """A queued or delivered (controller, command id); on a Cluster, per target (its slot)."""
        if self.tagged:
            return f"{QUEUE_SEEN_KEY}{{{client_id}}}:{controller}:{command}"
        return f"{QUEUE_SEEN_KEY}{controller}:{command}"

    def history(self, client_id: str) -> str:
        return self._of(HISTORY_KEY, client_id)

    def presence(self, instance: str) -> str:
        return self._of(INSTANCE_KEY, instance)

    def summary(self, instance: str) -> str:
        return self._of(SUMMARY_KEY, instance)

    def manifests(self, instance: str) -> str:
        return self._of(MANIFEST_KEY, instance)

    def series(self, instance: str) -> str:
        return self._of(SERIES_KEY, instance)

    def command_records(self, owner: str) -> str:
        """An owner's command records; with :meth:`command_record_times` in one slot (``{owner}``)."""
        return self._of(RECORDS_KEY, _braceless(owner))

    def command_record_times(self, owner: str) -> str:
        return self._of(RECORD_TIMES_KEY, _braceless(owner))

    def idempotency(self, caller: str, key: str) -> str:
        """``caller``'s record of ``key``; in one slot with its index and sizes (``{caller}``)."""
        return f"{self._of(IDEMPOTENCY_KEY, _braceless(caller))}:{key}"

    def idempotency_index(self, caller: str) -> str:
        return self._of(IDEMPOTENCY_INDEX_KEY, _braceless(caller))

    def idempotency_costs(self, caller: str) -> str:
        return self._of(IDEMPOTENCY_COST_KEY, _braceless(caller))


def _braceless(name: str) -> str:
    """A caller's name (a token's label may hold anything) that cannot break its keys' hash tag."""
    return name.replace("{", "(").replace("}", ")") or "~"
