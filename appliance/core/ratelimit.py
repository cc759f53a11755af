"""Token buckets with the clock passed in, so tests need no sleeping."""

from __future__ import annotations

__all__ = ["Budgets", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; ``rate == 0`` means unlimited."""

    __slots__ = ("rate", "burst", "_tokens", "_updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._updated = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._updated = now

    def full(self, now: float) -> bool:
        """True when the bucket has refilled completely (it then behaves like a new one)."""
        if self.unlimited:
            return True
        self._refill(now)
        return self._tokens >= self.burst

    def try_take(self, now: float) -> float:
        """Take a token if one is there: returns 0.0, else the seconds until one will be (nothing taken)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def reserve(self, now: float) -> float:
        """Take a token now, going into debt if needed: returns how long to wait before acting on it."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Budgets:
    """One bucket per name, made at the name's first use: names are token names, a bounded set."""

    __slots__ = ("rate", "burst", "_buckets")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def try_take(self, name: str, now: float) -> float:
        """``TokenBucket.try_take`` on ``name``'s bucket."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, now)
        return bucket.try_take(now)
