"""Who may start a handshake or an HTTP request: per-address and per-token limits, no I/O.

An appliance on the internet meets scanners that guess tokens, floods of connections
from one host and a leaked device token used a thousand times. :class:`Admission`
decides, with the clock passed in, before any work is done for a peer:

- an address that failed too many handshakes (wrong token, bad id; also HTTP 401/403)
  within a minute is refused for a cool-down, cheaply (HTTP 429 before the upgrade);
- an address may hold ``connections_per_address`` WebSockets and unanswered HTTP
  requests at once (4013, or HTTP 429, beyond), a token ``connections_per_token``
  WebSockets (4013 beyond);
- an address may make ``http_rate`` HTTP API requests per second (429 beyond).

IPv6 peers are grouped by /64, the block one subscriber usually holds, so a host cannot
dodge the limits by cycling through its own addresses. Addresses in ``exempt`` (loopback
by default: same-host peers, a local proxy not trusted for ``X-Forwarded-For``, the
bench) are never limited by address. Memory stays bounded: state that has returned to
its resting value is dropped by :meth:`Admission.prune`, which the callers run often.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from .ratelimit import TokenBucket

__all__ = ["Admission", "AdmissionLimits", "Refusal", "address_key", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(enum.Enum):
    """Why a peer is refused; the value is the metrics label."""

    COOLDOWN = "cooldown"  # Too many failed handshakes: HTTP 429 before the upgrade.
    ADDRESS_LIMIT = "address_limit"  # Too many connections from this address: 4013.
    TOKEN_LIMIT = "token_limit"  # Too many connections with this token: 4013.
    HTTP_RATE = "http_rate"  # Too many HTTP API requests per second: 429.


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"127.0.0.1, ::1, 10.0.0.0/8"`` as networks; raises ValueError on a malformed entry."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def address_key(address: str) -> str:
    """The key limits are counted under: the address, or its /64 for IPv6."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    except ValueError:
        return address


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """0 turns a limit off."""

    connections_per_address: int = 1000
    connections_per_token: int = 0
    failed_handshakes_per_minute: int = 30
    cooldown_seconds: float = 60.0
    http_rate: float = 100.0
    http_burst: int = 200
    exempt: tuple[Network, ...] = field(default_factory=tuple)


class Admission:
    """The limits' state for one instance (limits are per instance, like the connections they count)."""

    __slots__ = ("limits", "_by_address", "_by_token", "_failures", "_cooldown_until", "_http", "_pruned_at")

    #: Seconds between automatic prunes; pruning is O(tracked addresses).
    PRUNE_EVERY = 10.0

    def __init__(self, limits: AdmissionLimits, now: float) -> None:
        self.limits = limits
        self._by_address: dict[str, int] = {}
        self._by_token: dict[str, int] = {}
        self._failures: dict[str, TokenBucket] = {}
        self._cooldown_until: dict[str, float] = {}
        self._http: dict[str, TokenBucket] = {}
        self._pruned_at = now

    def exempt(self, address: str) -> bool:
        if not self.limits.exempt:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # "unknown", a Unix socket path: limited like any peer.
        return any(ip in network for network in self.limits.exempt)

    # --- WebSocket handshakes ---------------------------------------------------------------

    def cooling_down(self, address: str, now: float) -> float:
        """Seconds left of this address's cool-down (0.0 when it may try)."""
        until = self._cooldown_until.get(address_key(address))
        return max(0.0, until - now) if until is not None else 0.0

    def admit_socket(self, address: str, token_key: str | None, now: float) -> Refusal | None:
        """Count a new WebSocket, or say why it is refused. Admitted ones must be released."""
        self._maybe_prune(now)
        limits = self.limits
        key = None if self.exempt(address) else address_key(address)
        if key is not None:
            if self.cooling_down(address, now) > 0:
                return Refusal.COOLDOWN
            if limits.connections_per_address and self._by_address.get(key, 0) >= limits.connections_per_address:
                return Refusal.ADDRESS_LIMIT
        cap = limits.connections_per_token
        if token_key is not None and cap and self._by_token.get(token_key, 0) >= cap:
            return Refusal.TOKEN_LIMIT
        if key is not None:
            self._by_address[key] = self._by_address.get(key, 0) + 1
        if token_key is not None:
            self._by_token[token_key] = self._by_token.get(token_key, 0) + 1
        return None

    def release_socket(self, address: str, token_key: str | None) -> None:
        """A WebSocket admitted by :meth:`admit_socket` has ended."""
        if not self.exempt(address):
            _decrement(self._by_address, address_key(address))
        if token_key is not None:
            _decrement(self._by_token, token_key)

    def handshake_failed(self, address: str, now: float) -> bool:
        """Record a failed handshake; True when it starts this address's cool-down."""
        per_minute = self.limits.failed_handshakes_per_minute
        if not per_minute or self.exempt(address):
            return False
        key = address_key(address)
        bucket = self._failures.get(key)
        if bucket is None:
            bucket = self._failures[key] = TokenBucket(per_minute / 60.0, per_minute, now)
        if bucket.try_take(now) == 0.0:
            return False
        already = self.cooling_down(address, now) > 0
        self._cooldown_until[key] = now + self.limits.cooldown_seconds
        return not already

    # --- HTTP -------------------------------------------------------------------------------

    def admit_request(self, address: str, now: float) -> Refusal | None:
        """Count an HTTP request in the address's connections until it is answered; admitted ones must be released.

        A request still sending its body has not been authenticated by anything yet: counted with
        the WebSockets, one host cannot hold more of them than ``connections_per_address``.
        """
        self._maybe_prune(now)
        if self.exempt(address):
            return None
        key = address_key(address)
        cap = self.limits.connections_per_address
        if cap and self._by_address.get(key, 0) >= cap:
            return Refusal.ADDRESS_LIMIT
        self._by_address[key] = self._by_address.get(key, 0) + 1
        return None

    def release_request(self, address: str) -> None:
        """A request admitted by :meth:`admit_request` has been answered (or its connection is gone)."""
        if not self.exempt(address):
            _decrement(self._by_address, address_key(address))

    def admit_http(self, address: str, now: float) -> float:
        """0.0 to serve the request, else the seconds until this address may ask again."""
        self._maybe_prune(now)
        if self.exempt(address):
            return 0.0
        wait = self.cooling_down(address, now)
        if wait > 0 or not self.limits.http_rate:
            return wait
        key = address_key(address)
        bucket = self._http.get(key)
        if bucket is None:
            bucket = self._http[key] = TokenBucket(self.limits.http_rate, self.limits.http_burst, now)
        return bucket.try_take(now)

    # --- memory -----------------------------------------------------------------------------

    def tracked(self) -> int:
        """Entries held, for tests and the bound on memory."""
        return sum(len(d) for d in (self._by_address, self._by_token, self._failures, self._cooldown_until, self._http))

    def _maybe_prune(self, now: float) -> None:
        if now - self._pruned_at >= self.PRUNE_EVERY or now < self._pruned_at:
            self.prune(now)

    def prune(self, now: float) -> None:
        """Forget what has returned to rest: ended cool-downs, buckets that have refilled."""
        self._pruned_at = now
        self._cooldown_until = {k: t for k, t in self._cooldown_until.items() if t > now}
        for buckets in (self._failures, self._http):
            for key in [k for k, b in buckets.items() if b.full(now)]:
                del buckets[key]


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
