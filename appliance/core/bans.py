"""The ban list's rules, no I/O: what may be banned, for how long, and whom a ban refuses.

An operator bans a client id (a stolen device's, a misbehaving script's) or an address
(one IP, or a CIDR block such as ``203.0.113.0/24``) for a duration. A banned peer is
refused at the handshake with 4016, whatever its token and role, until the ban ends or is
lifted; banning also disconnects what the ban covers (appliance/gate.py). Disconnecting
alone was never enough: a kicked client reconnects at once.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .protocol import CLIENT_ID_PATTERN

__all__ = ["BAN_SECONDS_MAX", "Ban", "BanList", "parse_target"]

#: The longest ban: a year; longer is a token to revoke, not a ban.
BAN_SECONDS_MAX = 365 * 86400

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_target(text: str) -> tuple[str, str]:
    """``("id", id)`` or ``("address", network)`` for what an operator typed; ValueError says what is wrong.

    An address is normalised to its network (``203.0.113.7`` -> ``203.0.113.7/32``), so one
    address or block has one key whatever way it was written.
    """
    text = text.strip()
    if CLIENT_ID_PATTERN.fullmatch(text):
        return "id", text
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{text[:60]!r} is neither a client id (letters, digits, _ and -, at most 50) nor an IP address or CIDR block"
        ) from None
    if network.num_addresses > 2 ** (32 - 8 if network.version == 4 else 128 - 32):
        raise ValueError(f"{network} is too wide to ban: at most a /8 (IPv4) or a /32 (IPv6)")
    return "address", str(network)


@dataclass(frozen=True, slots=True)
class Ban:
    kind: str  # "id" or "address"
    target: str  # the client id, or the network (``203.0.113.7/32``)
    until: float  # epoch seconds
    by: str  # the operator (token name) who banned
    reason: str
    at: float  # epoch seconds

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}"

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, record: str) -> Ban:
        data = json.loads(record)
        return cls(
            str(data["kind"]),
            str(data["target"]),
            float(data["until"]),
            str(data["by"]),
            str(data.get("reason", "")),
            float(data["at"]),
        )

    def shown_target(self) -> str:
        """The address without ``/32`` (``/128``) when it is one address."""
        if self.kind == "address" and self.target.endswith(("/32", "/128")):
            return self.target.rsplit("/", 1)[0]
        return self.target


class BanList:
    """The live bans, indexed for the handshake: one dict look-up for the id, a scan of the blocks for the address."""

    __slots__ = ("bans", "_ids", "_networks")

    def __init__(self, bans: Iterable[Ban] = ()) -> None:
        self.bans = sorted(bans, key=lambda ban: ban.at, reverse=True)  # Newest first, as the page lists them.
        self._ids = {ban.target: ban for ban in self.bans if ban.kind == "id"}
        self._networks = [(ipaddress.ip_network(ban.target), ban) for ban in self.bans if ban.kind == "address"]

    @classmethod
    def decode(cls, records: Iterable[str]) -> BanList:
        """The list from stored records; a record that does not decode is skipped (never blocks a handshake)."""
        bans = []
        for record in records:
            try:
                bans.append(Ban.decode(record))
            except (ValueError, KeyError, TypeError):
                continue
        return cls(bans)

    def blocking(self, client_id: str, address: str | None, now: float) -> Ban | None:
        """The unexpired ban that refuses ``client_id`` connecting from ``address``, if any."""
        ban = self._ids.get(client_id)
        if ban is not None and ban.until > now:
            return ban
        if address is None or not self._networks:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        for network, ban in self._networks:
            if ban.until > now and ip.version == network.version and ip in network:
                return ban
        return None

    def live(self, now: float) -> list[Ban]:
        return [ban for ban in self.bans if ban.until > now]

    def __len__(self) -> int:
        return len(self.bans)
