"""The ban list as a service: ban, lift and list, audited, on the broker (cluster-wide); the handshake reads it.

Used by the dashboard (ui/bans.py) and the HTTP API (``/api/v1/bans``), with the admin
token only. Banning stores the ban first, then disconnects what it covers (4016), so a
kicked client that reconnects at once, to any instance, already meets the ban: the id's
connection wherever it is, the connections presence shows from a banned address; each
instance's watch (:meth:`appliance.gate.Gate.watch`) closes within a second what presence
did not show yet. The
handshake (appliance/gate.py) reads the same list: one small read of its version per
handshake, the list itself only after a change.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from .audit import AuditEvent, AuditLog
from .brokers.base import Broker
from .core.bans import BAN_SECONDS_MAX, Ban, BanList, parse_target
from .core.protocol import CloseCode
from .gate import Gate

if TYPE_CHECKING:
    from .commands.service import CommandService

__all__ = ["BanService"]

log = logging.getLogger(__name__)

#: Bans held at once: the list is read whole after each change, and operators write it by hand.
MAX_BANS = 1000


class BanService:
    def __init__(self, gate: Gate, audit: AuditLog, commands: CommandService) -> None:
        self.broker: Broker = gate.broker
        self.gate = gate
        self.audit = audit
        self.commands = commands

    async def current(self) -> BanList:
        """The ban list (BrokerUnavailable when it cannot be read); :meth:`BanList.live` for the unexpired."""
        return await self.gate.bans()

    async def ban(
        self, target: str, seconds: float, actor: str, source: str, reason: str = "", *, via: str = "dashboard"
    ) -> tuple[Ban, int]:
        """Ban ``target`` (an id, an address or a CIDR block) for ``seconds``; returns the ban and how many
        connections it closed. ValueError says what is wrong with the request."""
        kind, normal = parse_target(target)
        if not 60 <= seconds <= BAN_SECONDS_MAX:
            raise ValueError(f"a ban lasts from 60 seconds to {BAN_SECONDS_MAX // 86400} days")
        reason = " ".join(reason.split())[:200]
        listed = await self.current()
        now = time.time()
        if len(listed.live(now)) >= MAX_BANS and all(b.key != f"{kind}:{normal}" for b in listed.bans):
            raise ValueError(f"the ban list holds {MAX_BANS} bans; lift some first")
        ban = Ban(kind, normal, now + seconds, actor, reason, now)
        await self.broker.put_ban(ban.key, ban.encode(), ban.until)
        kicked = await self._kick(ban)
        await self.audit.record(
            AuditEvent(
                "ban.add",
                actor,
                source,
                ban.key,
                {"seconds": round(seconds), "reason": reason, "closed": kicked, "via": via},
            )
        )
        log.info("Banned %s for %.0f s by %s; %d connection(s) closed", ban.key, seconds, actor, kicked)
        return ban, kicked

    async def lift(self, key: str, actor: str, source: str, *, via: str = "dashboard") -> bool:
        """Lift the ban ``key`` (``id:<id>`` or ``address:<network>``); False if there was none."""
        lifted = await self.broker.drop_ban(key)
        if lifted:
            await self.audit.record(AuditEvent("ban.lift", actor, source, key, {"via": via}))
            log.info("Lifted the ban on %s by %s", key, actor)
        return lifted

    async def _kick(self, ban: Ban) -> int:
        """Close what the ban covers, on every instance: the id's connection, or every connection from the block."""
        code = int(CloseCode.BANNED)
        if ban.kind == "id":
            return int(await self.commands.disconnect(ban.target, code))
        network = ipaddress.ip_network(ban.target)
        closed = 0
        for record in await self.broker.presence():
            if _in(network, record):
                closed += await self.commands.disconnect(str(record["id"]), code)
        return closed


def _in(network: ipaddress.IPv4Network | ipaddress.IPv6Network, record: dict[str, Any]) -> bool:
    host = str(record.get("remote") or "").rsplit(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == network.version and ip in network
