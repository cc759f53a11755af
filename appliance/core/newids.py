"""How many ids never seen before one token or one address may bring in a window, no I/O.

Every id that connects gets a presence row and, when it leaves, a connect history kept for
days. The shared client token is held by a whole fleet, so with no limit one host holding it
could cycle fresh ids without end and push every real device's history out of the bounded
store (issue #20, item 4). An id is *new* when nobody holds it and it has no connect history;
such an id is counted once per window under its token and under its address (a /64 for
IPv6, :func:`~appliance.core.admission.address_key`), and refused with 4015 once either count
is over its limit. Known ids (a device reconnecting) are never counted nor refused.

The counts are fixed windows that start at the first new id and expire as a whole: in Redis
one ``INCR`` on a key created with the window's expiry (cluster-wide), in memory
:class:`FixedWindows` (one instance).
"""

from __future__ import annotations

from dataclasses import dataclass

from .admission import address_key

__all__ = ["FixedWindows", "NewIdLimits", "WindowCount"]


@dataclass(frozen=True, slots=True)
class WindowCount:
    """A counter's value after one more, and the seconds until its window ends."""

    count: int
    left: float


@dataclass(frozen=True, slots=True)
class NewIdLimits:
    """0 turns a limit off; the address limit never applies to an exempt address."""

    per_token: int = 1000
    per_address: int = 200
    window: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.per_token or self.per_address)

    def counters(self, token: str | None, address: str | None) -> list[tuple[str, int]]:
        """The counters a new id goes into, as ``(key, limit)``: its token's and its address's.

        ``token`` is the token's name (a leaked scoped token counts apart from the shared one);
        ``address`` is None when it is exempt from per-address limits.
        """
        found: list[tuple[str, int]] = []
        if token is not None and self.per_token:
            found.append((f"tok:{token}", self.per_token))
        if address is not None and self.per_address:
            found.append((f"addr:{address_key(address)}", self.per_address))
        return found

    @staticmethod
    def refusal(counted: list[tuple[str, int, WindowCount]]) -> tuple[str, float] | None:
        """``(which, retry_after)`` for the first counter over its limit (``token`` or ``address``), else None."""
        for key, limit, value in counted:
            if value.count > limit:
                return ("token" if key.startswith("tok:") else "address"), value.left
        return None


class FixedWindows:
    """Counters that each live ``window`` seconds from their first count; at most ``max_keys`` held.

    Beyond ``max_keys`` live counters the one that expires first is dropped, so a flood of
    fresh addresses cannot grow memory (its own counter restarting is the worst it gains).
    """

    __slots__ = ("max_keys", "_counts")

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (count, ends at); insertion order = end order

    def add(self, key: str, window: float, now: float) -> WindowCount:
        held = self._counts.get(key)
        if held is None or held[1] <= now:
            self._counts.pop(key, None)
            if len(self._counts) >= self.max_keys:
                self.prune(now)
                while len(self._counts) >= self.max_keys:
                    del self._counts[next(iter(self._counts))]
            held = (0, now + window)
        count, ends = held[0] + 1, held[1]
        self._counts[key] = (count, ends)
        return WindowCount(count, ends - now)

    def prune(self, now: float) -> None:
        """Forget the windows that have ended (they are kept in the order they end: stop at the first live one)."""
        for key in list(self._counts):
            if self._counts[key][1] > now:
                break
            del self._counts[key]

    def __len__(self) -> int:
        return len(self._counts)
