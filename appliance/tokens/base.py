"""The token store contract: which token a connection or request presented, and what it grants.

One contract, two backends (:mod:`.env` for the embedded default, :mod:`.ssm` for AWS
SSM Parameter Store). Every check of a token, WebSocket or HTTP, goes through
:meth:`TokenStore.lookup`, the one comparator: it compares SHA-256 digests with
:func:`hmac.compare_digest` against *every* candidate, so the time it takes says
nothing about which token, or how many, were close.

A token name has one current version and, right after a rotation, a previous
version that stays valid for the grace window. Errors: :class:`TokenStoreUnavailable`
(the backend cannot be read; the message is safe to show, it holds no value),
:class:`TokenStoreNotStarted` (used before :meth:`TokenStore.load`), and
:class:`RotationUnavailable` (this store or configuration cannot rotate).
"""

from __future__ import annotations

import abc
import fnmatch
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.protocol import Role

__all__ = [
    "ROLE_BY_NAME",
    "ADMIN_PREFIX",
    "CALLER_NAME",
    "CONTROLLER_PREFIX",
    "SCOPED_PREFIX",
    "Grant",
    "RotationUnavailable",
    "TokenState",
    "TokenStore",
    "TokenStoreError",
    "TokenStoreNotStarted",
    "TokenStoreUnavailable",
    "TokenVersion",
    "MIN_TOKEN_BITS",
    "estimated_bits",
    "low_entropy",
    "fingerprint",
    "caller_of",
    "role_of",
]

#: Fixed token names (the seed's SSM names) and the role each grants.
ROLE_BY_NAME = {
    "LLM_SECRET_TOKEN": Role.CONTROLLER.value,
    "UNITY_CLIENT_TOKEN": Role.CLIENT.value,
    "ADMIN_TOKEN": Role.ADMIN.value,
    "VIEWER_TOKEN": Role.VIEWER.value,
}
#: Scoped client tokens are named ``client_tokens/<name>``; each grants the client role for matching ids only.
SCOPED_PREFIX = "client_tokens/"
_SCOPED_NAME = re.compile(r"^client_tokens/[A-Za-z0-9_.-]{1,64}$")
#: Named controller and admin tokens, ``controller_tokens/<name>`` and ``admin_tokens/<name>`` (the value is
#: the token itself): each agent or person gets its own token, and ``<name>`` is who acts with it in the audit
#: trail, in recent commands and in the rate limits of HTTP and MCP callers.
CONTROLLER_PREFIX = "controller_tokens/"
ADMIN_PREFIX = "admin_tokens/"
#: The alphabet of a caller's name: the ``<name>`` of a named token, or ``CONTROLLER_TOKEN_NAME``/``ADMIN_TOKEN_NAME``.
CALLER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NAMED = {CONTROLLER_PREFIX: Role.CONTROLLER.value, ADMIN_PREFIX: Role.ADMIN.value}
#: An id pattern is a shell-style glob over the client-id alphabet (``lights_*``, ``kiosk-?``).
ID_PATTERN = re.compile(r"^[A-Za-z0-9_*?-]{1,50}$")
#: A group a scoped client token may join: a name as in ``?groups=`` (no glob: each group is named).
GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,50}$")


class TokenStoreError(RuntimeError):
    """Base class of token-store errors."""


class TokenStoreUnavailable(TokenStoreError):
    """The backend cannot be read or written; the message names no value."""


class TokenStoreNotStarted(TokenStoreError):
    """The store was used before ``load()``."""


class RotationUnavailable(TokenStoreError):
    """Rotation was asked of a store or configuration that cannot do it (env store, rotation disabled)."""


def role_of(name: str) -> str | None:
    """The role a token name grants, or None for names that are not tokens (``REDIS_PASSWORD``)."""
    if name in ROLE_BY_NAME:
        return ROLE_BY_NAME[name]
    if _SCOPED_NAME.match(name):
        return Role.CLIENT.value
    prefix, _, rest = name.partition("/")
    return _NAMED.get(prefix + "/") if CALLER_NAME.match(rest) else None


def caller_of(name: str, labels: dict[str, str] | None = None) -> str | None:
    """Who acts with token ``name``: the ``<name>`` of a named token, a fixed token's label, or None.

    None (the fixed tokens without ``CONTROLLER_TOKEN_NAME``/``ADMIN_TOKEN_NAME``) keeps the names
    callers had before named tokens: ``http``, ``mcp``, ``ADMIN_TOKEN``.
    """
    prefix, _, rest = name.partition("/")
    if prefix + "/" in _NAMED and CALLER_NAME.match(rest):
        return rest
    return (labels or {}).get(name)


def fingerprint(value: str, key: bytes) -> str:
    """A short public handle on a value: 32 bits of its HMAC-SHA-256 under the deployment's key.

    Tells versions apart. Keyed, so whoever sees it (the viewer token) cannot test guesses of
    a token offline; an unkeyed hash prefix let them try a weak, human-chosen token at will.
    """
    return "hmac:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:8]


#: Tokens with less estimated randomness are refused at start (``ALLOW_WEAK_TOKENS`` overrides).
MIN_TOKEN_BITS = 128
#: Alphabets from the smallest up: a token is judged by the smallest one holding all its characters.
_ALPHABETS = (
    frozenset("0123456789"),
    frozenset("0123456789abcdef"),
    frozenset("0123456789ABCDEF"),
    frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567="),  # base32
    frozenset("abcdefghijklmnopqrstuvwxyz0123456789"),
    frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
    frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
    frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"),  # token_urlsafe
    frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/="),  # base64
)


def estimated_bits(value: str) -> int:
    """At most how many bits of randomness ``value`` can hold: its length times log2 of its alphabet.

    An upper bound judged from the text alone: it catches short tokens and small alphabets
    (a 20-digit PIN, 16 hex digits), not a long passphrase; the fingerprint's key covers that.
    """
    chars = set(value)
    size = next((len(alphabet) for alphabet in _ALPHABETS if chars <= alphabet), 95)
    return int(len(value) * math.log2(size))


def low_entropy(named: dict[str, str]) -> list[str]:
    """One clear line for each token with fewer than :data:`MIN_TOKEN_BITS` estimated bits of randomness."""
    return [
        f"{name} holds at most {estimated_bits(value)} bits of randomness (judged from its length and alphabet), "
        f"fewer than {MIN_TOKEN_BITS}; use 32 random bytes, or set ALLOW_WEAK_TOKENS=true to start anyway"
        for name, value in named.items()
        if estimated_bits(value) < MIN_TOKEN_BITS
    ]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token grants: a role, which token (name and version) opened it, and for scoped
    client tokens the ids it may use and the groups it may join."""

    role: str  # a Role's value
    name: str
    version: int
    id_pattern: str | None = None
    #: The groups a connection may join; None (the shared client token): any group, as before groups were scoped.
    groups: tuple[str, ...] | None = None
    #: Who acts with it (:func:`caller_of`); None: an unnamed fixed token.
    caller: str | None = None

    @property
    def budget(self) -> str:
        """The rate-limit bucket of HTTP and MCP commands sent with this token: one per token name."""
        return self.name

    def actor(self, unnamed: str) -> str:
        """The name this grant's holder acts under, ``unnamed`` for an unnamed fixed token."""
        return self.caller or unnamed

    def allows_id(self, client_id: str) -> bool:
        return self.id_pattern is None or fnmatch.fnmatchcase(client_id, self.id_pattern)

    def allows_groups(self, groups: tuple[str, ...]) -> bool:
        """Whether a connection with this grant may join every one of ``groups``."""
        return self.groups is None or all(group in self.groups for group in groups)


@dataclass(frozen=True, slots=True)
class TokenVersion:
    version: int
    value: str = field(repr=False)
    modified_at: float | None = None  # when this version was written (epoch seconds), if known
    id_pattern: str | None = None
    groups: tuple[str, ...] | None = None  # scoped client tokens: the groups they may join (None: any)


@dataclass(frozen=True, slots=True)
class TokenState:
    """One token name: its current version and, during a grace window, the previous one."""

    name: str
    role: str
    current: TokenVersion
    previous: TokenVersion | None = None
    grace_ends: float | None = None  # the previous version is accepted until then
    keep_connections: bool = False  # connections opened with the previous version survive its expiry

    def previous_accepted(self, now: float) -> bool:
        return self.previous is not None and self.grace_ends is not None and now < self.grace_ends

    def status(self, now: float, key: bytes, caller: str | None = None) -> dict[str, Any]:
        """What may be shown of this token: never a value (fingerprints under ``key``)."""
        previous = self.previous
        return {
            "name": self.name,
            "role": self.role,
            "caller": caller,
            "version": self.current.version,
            "fingerprint": fingerprint(self.current.value, key),
            "rotated_at": self.current.modified_at,
            "id_pattern": self.current.id_pattern,
            "groups": list(self.current.groups) if self.current.groups is not None else None,
            "previous_version": previous.version if previous else None,
            "previous_fingerprint": fingerprint(previous.value, key) if previous else None,
            "grace_ends": self.grace_ends if previous else None,
            "previous_accepted": self.previous_accepted(now),
            "keep_connections": self.keep_connections if previous else False,
        }


class TokenStore(abc.ABC):
    """Valid tokens by name; :meth:`lookup` is the one comparator of the appliance."""

    name: str
    #: Whether :mod:`.service` can rotate and revoke through this store.
    rotatable = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._states: dict[str, TokenState] | None = None
        # (digest, grant, accepted until) for every acceptable value; rebuilt on each change.
        self._candidates: list[tuple[bytes, Grant, float | None]] = []
        self._listeners: list[Callable[[], None]] = []
        #: The key of the fingerprints shown (make_token_store sets the deployment's; random: this process's own).
        self.fingerprint_key = secrets.token_bytes(32)
        #: Who acts with the fixed tokens (``LLM_SECRET_TOKEN``: ``CONTROLLER_TOKEN_NAME``, ...); make_token_store sets it.
        self.labels: dict[str, str] = {}

    # --- loading ------------------------------------------------------------------------

    @abc.abstractmethod
    def load(self) -> None:
        """Read every token now (blocking); raises :class:`TokenStoreUnavailable` if it cannot."""

    async def refresh(self) -> bool:
        """Re-read the tokens; a failure keeps the last good values. True if the read succeeded."""
        return True

    def health(self) -> dict[str, Any]:
        """For ``/readyz``: public detail, no values."""
        return {"store": self.name, "ok": True}

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously) after every change of the valid tokens."""
        self._listeners.append(listener)

    def _publish(self, states: dict[str, TokenState]) -> None:
        candidates: list[tuple[bytes, Grant, float | None]] = []
        for state in states.values():
            current, caller = state.current, caller_of(state.name, self.labels)
            candidates.append(
                (
                    _digest(current.value),
                    Grant(state.role, state.name, current.version, current.id_pattern, current.groups, caller),
                    None,
                )
            )
            previous = state.previous
            if previous is not None and state.grace_ends is not None:
                grant = Grant(state.role, state.name, previous.version, previous.id_pattern, previous.groups, caller)
                candidates.append((_digest(previous.value), grant, state.grace_ends))
        changed = states != self._states
        self._states, self._candidates = states, candidates
        if changed:
            for listener in self._listeners:
                listener()

    @property
    def states(self) -> dict[str, TokenState]:
        if self._states is None:
            raise TokenStoreNotStarted(f"{type(self).__name__} used before load()")
        return self._states

    # --- the comparator -----------------------------------------------------------------

    def lookup(self, presented: str | None) -> Grant | None:
        """The grant of ``presented``, or None. Constant-time in the value, whatever the number of tokens."""
        if self._states is None:
            raise TokenStoreNotStarted(f"{type(self).__name__} used before load()")
        if not presented:
            return None
        digest = _digest(presented)
        now = self.clock()
        found: Grant | None = None
        for candidate, grant, until in self._candidates:  # No early exit: every candidate is compared.
            if hmac.compare_digest(digest, candidate) and (until is None or now < until):
                found = grant
        return found

    # --- for eviction, status and log redaction ------------------------------------------

    def connection_allowed(self, name: str, version: int) -> bool:
        """Whether a connection opened with (name, version) may stay open now."""
        state = self.states.get(name)
        if state is None:
            return False
        if version == state.current.version:
            return True
        if state.previous is None or version != state.previous.version:
            return False
        return state.keep_connections or state.previous_accepted(self.clock())

    def next_expiry(self) -> float | None:
        """The next moment a grace window ends (connections may have to be evicted then)."""
        now = self.clock()
        ends = [s.grace_ends for s in self.states.values() if s.grace_ends is not None and s.grace_ends > now]
        return min(ends) if ends else None

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        key, labels = self.fingerprint_key, self.labels
        return [self.states[name].status(now, key, caller_of(name, labels)) for name in sorted(self.states)]

    def secret_values(self) -> list[str]:
        """Every known value, for the log filter; never for anything that leaves the process."""
        values = []
        for state in self.states.values():
            values.append(state.current.value)
            if state.previous is not None:
                values.append(state.previous.value)
        return values
