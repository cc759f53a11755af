"""The command service: commands with an id, their outcomes, replies, broadcast, the offline queue.

One :class:`CommandService` per instance, on ``app.state.commands``. The relay hands it
controller commands that carry an ``id`` (or name ``*`` or a group) and every client
message; the HTTP API, the MCP tools and the dashboard call
:meth:`CommandService.send_command` and :meth:`CommandService.disconnect`.

A command travels from the sender's instance (where its :class:`PendingTable` entry
waits, with its deadline: :mod:`.service`) to the target's instance, which frames it for
the client and keeps version-1 clients' replies in order (:mod:`.handover`), and every
outcome comes back to the sender's instance as an
:mod:`~appliance.core.events` outcome through the broker's per-instance channel.
Broadcast and group commands go to every instance at once (:mod:`.broadcast`). The
decisions are the pure objects of :mod:`appliance.core.requests`; this package only moves
their results.
"""

from .outcome import HTTP_CONTROLLER, Outcome
from .service import CommandService

__all__ = ["HTTP_CONTROLLER", "CommandService", "Outcome"]
