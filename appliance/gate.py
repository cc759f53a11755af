"""Who may connect as which id, cluster-wide: the ban list, and the rate of new ids (appliance/web.py asks).

The admission middleware (appliance/admission.py) refuses floods before the app, per
instance and without knowing ids. This gate runs once the token is judged, on the broker
(Redis when configured, so every instance sees the same bans and counts):

- an id or address on the ban list (core/bans.py) is refused with 4016, whatever the token;
- a client id never seen before (nobody holds it, no connect history) is counted under its
  token and address (core/newids.py); over either limit it is refused with 4015. Addresses
  in ``LIMITS_EXEMPT_IPS`` are not counted at all (same-host peers, the bench).

Both refusals count in ``wsbridge_admission_refused_total{reason}`` (``banned``,
``new_ids_token``, ``new_ids_address``). When the broker cannot be reached the claim
that follows would fail anyway: the gate answers 1013 at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from .admission import ADMISSION_REFUSED
from .brokers.base import Broker, BrokerUnavailable
from .core.admission import parse_networks
from .core.bans import BanList
from .core.newids import NewIdLimits
from .core.protocol import CloseCode, Role
from .registry import LocalConnections
from .settings import Settings

__all__ = ["Gate"]

log = logging.getLogger(__name__)


class Gate:
    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.broker = broker
        self.limits = NewIdLimits(settings.new_ids_per_token, settings.new_ids_per_address, settings.new_ids_window)
        self._exempt = parse_networks(settings.limits_exempt_ips)
        self._version: int | None = None
        self._bans = BanList()
        self._enforced: int | None = None  # The ban list's version :meth:`watch` last enforced.

    async def bans(self) -> BanList:
        """The ban list, read again only when its version moved (BrokerUnavailable when it cannot be read)."""
        version, records = await self.broker.bans(self._version)
        if records is not None:
            self._bans = BanList.decode(records.values())
            self._version = version
        return self._bans

    async def watch(self, local: LocalConnections, every: float = 1.0) -> None:
        """Close this instance's connections that a new ban covers, soon after any instance stored it.

        The ban service closes at once what presence shows; presence in Redis is written every
        few seconds, so a connection opened just before the ban (or one that passed this gate
        while the ban was being stored) is closed here, by the instance that holds it.
        """
        while True:
            await asyncio.sleep(every)
            try:
                bans = await self.bans()
            except BrokerUnavailable:
                continue
            except Exception:  # A bug must not end the watch.
                log.exception("Reading the ban list failed")
                continue
            if self._version == self._enforced:
                continue
            self._enforced = self._version
            now = time.time()
            for client_id, conn in list(local.by_id.items()):
                if bans.blocking(client_id, conn.remote.rsplit(":", 1)[0], now) is not None:
                    local.disconnect_local(client_id, int(CloseCode.BANNED))

    async def admit(self, client_id: str, role: Role, token: str | None, address: str | None) -> CloseCode | None:
        """None to go on with the claim, else the close code that refuses the handshake."""
        try:
            ban = (await self.bans()).blocking(client_id, address, time.time())
            if ban is not None:
                ADMISSION_REFUSED.labels(reason="banned").inc()
                log.info("Refused %s from %s: banned (%s)", client_id, address, ban.key)
                return CloseCode.BANNED
            if role is Role.CLIENT and self.limits.enabled and not self._is_exempt(address):
                return await self._new_id(client_id, token, address)
        except BrokerUnavailable as exc:
            log.warning("Refusing %s: %s", client_id, exc)
            return CloseCode.TRY_AGAIN_LATER
        return None

    async def _new_id(self, client_id: str, token: str | None, address: str | None) -> CloseCode | None:
        if await self.broker.id_known(client_id):
            return None
        counters = self.limits.counters(token, address)
        counted = [(key, limit, await self.broker.count_in_window(key, self.limits.window)) for key, limit in counters]
        refusal = self.limits.refusal(counted)
        if refusal is None:
            return None
        which, retry_after = refusal
        ADMISSION_REFUSED.labels(reason=f"new_ids_{which}").inc()
        log.info(
            "Refused new id %s from %s: too many new ids with this %s; the window ends in %.0f s",
            client_id,
            address,
            which,
            retry_after,
        )
        return CloseCode.TOO_MANY_NEW_IDS

    def _is_exempt(self, address: str | None) -> bool:
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._exempt)
