"""The Redis broker: any number of instances share pub/sub, id ownership and presence.

Connections to Redis are constant per instance, whatever the number of clients: one
subscriber connection multiplexing every local id's channel, and a small bounded pool for
publishing (batched into pipelines, in order) and presence.

The parts, one job each (key names in :mod:`.keys`, payloads in :mod:`.codec`):

- :mod:`.target`: where Redis is (one URL, Sentinels, a Cluster);
- :mod:`.link`: the connections, and whether Redis is up (``/readyz``);
- :mod:`.subscriber`: the subscriber connection, its channels, reconnects;
- :mod:`.outbox`: everything published, in order, and local delivery during an outage;
- :mod:`.outcomes`: exactly one outcome per published command;
- :mod:`.ownership`: who holds each id (``wsb:owner:{id}``), claims, releases, re-assertion;
- :mod:`.presence`: every instance's connections and counters, and the heartbeat;
- :mod:`.history`: connect history (``wsb:hist:{id}``);
- :mod:`.queue`: the offline queue (``wsb:q:{id}``);
- :mod:`.records`: command records for follow-ups (``wsb:cmd:{owner}``), capped per owner;
- :mod:`.idempotency`: idempotency records (``wsb:idem:{caller}:<key>``), budgeted per caller;
- :mod:`.broker`: :class:`RedisBroker`, which wires them and answers the broker contract.

Channels: ``wsb:c:{id}`` of one id (commands and kicks; ``PUBLISH`` returns the number of
instances subscribed, so 0 means ``target_offline``), ``wsb:i:{instance}`` of one instance
(outcomes and command-service events), ``wsb:fan`` (broadcast and group commands, every
instance), ``wsb:controllers`` (reply frames for every controller).

During an outage the instance keeps its local clients: a command whose target is local is
delivered directly, others fail with ``delivery_failed``; the subscriber reconnects with
backoff, resubscribes and reasserts every local id, and releases the ids whose connections
closed meanwhile (so a reconnect under ``DUPLICATE_POLICY=reject`` is not blocked by a
stale owner).
"""

from __future__ import annotations

from .broker import RedisBroker
from .keys import CLIENT_CHANNEL, INSTANCE_KEY, OWNER_KEY
from .target import RedisTarget

__all__ = ["CLIENT_CHANNEL", "INSTANCE_KEY", "OWNER_KEY", "RedisBroker", "RedisTarget"]
