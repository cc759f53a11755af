"""The clients table's query: filter, sort and page presence records (pure: no I/O, no clock).

Paging is by cursor, not offset: the cursor names the last row shown (its sort key and
identity), so the next page starts right after it even when rows were added or removed
in between.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

__all__ = [
    "AUDIT_LIMITS",
    "PAGE_SIZES",
    "SORTS",
    "AuditQuery",
    "ClientQuery",
    "Page",
    "facets",
    "run_query",
    "summarize",
    "token_key",
]

#: Columns the table can be sorted by, and whether their natural order is descending.
SORTS: dict[str, bool] = {
    "id": False,
    "instance": False,
    "connected_since": True,
    "last_activity": True,
    "messages_in": True,
    "messages_out": True,
}
PAGE_SIZES = (25, 50, 100, 200)
_NUMERIC = {"messages_in", "messages_out"}


def _identity(record: dict[str, Any]) -> tuple[str, str]:
    return (str(record.get("id", "")), str(record.get("instance", "")))


def token_key(record: dict[str, Any]) -> str:
    """Which token version opened a connection, as the filter names it: ``NAME:version``."""
    version = record.get("token_version")
    if version is None:
        return ""
    return f"{record['token']}:{version}" if record.get("token") else str(version)


def _groups(record: dict[str, Any]) -> list[str]:
    groups = record.get("groups") or []
    return [str(g) for g in groups] if isinstance(groups, list | tuple) else [str(groups)]


@dataclass(frozen=True, slots=True)
class ClientQuery:
    """What the operator asked for; every field comes from the query string and is validated here."""

    search: str = ""  # a piece of the id, the address or a group, any case
    role: str = ""
    instance: str = ""
    group: str = ""
    token_version: str = ""
    sort: str = "id"
    descending: bool = False
    limit: int = 50
    cursor: str = ""

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ClientQuery:
        sort = params.get("sort", "id")
        if sort not in SORTS:
            sort = "id"
        order = params.get("order", "")
        descending = SORTS[sort] if order not in ("asc", "desc") else order == "desc"
        try:
            limit = int(params.get("limit", "50"))
        except ValueError:
            limit = 50
        return cls(
            search=params.get("q", "").strip()[:200],
            role=params.get("role", "") if params.get("role", "") in ("client", "controller") else "",
            instance=params.get("instance", "")[:200],
            group=params.get("group", "")[:200],
            token_version=params.get("token_version", "")[:200],
            sort=sort,
            descending=descending,
            limit=limit if limit in PAGE_SIZES else 50,
            cursor=params.get("cursor", "")[:1000],
        )

    def matches(self, record: dict[str, Any]) -> bool:
        # Exact comparisons first: the search, the dearest test, then runs on fewer records.
        return (
            (not self.role or record.get("role") == self.role)
            and (not self.instance or record.get("instance") == self.instance)
            and (not self.group or self.group in _groups(record))
            and (
                not self.token_version
                or token_key(record) == self.token_version
                or str(record.get("token_version", "")) == self.token_version
            )
            and (not self.search or self._found(record, self.search.lower()))
        )

    @staticmethod
    def _found(record: dict[str, Any], needle: str) -> bool:
        """The search text anywhere in the id, the remote address or a group name, ignoring case."""
        client_id = record.get("id", "")
        if needle in client_id or needle in client_id.lower():
            return True
        if needle in str(record.get("remote", "")):  # Addresses have no case (IPv6 hex is written lower).
            return True
        groups = record.get("groups")
        return bool(groups) and any(needle in group.lower() for group in _groups(record))

    def key(self, record: dict[str, Any]) -> tuple[Any, ...]:
        raw = record.get(self.sort)
        value = int(raw or 0) if self.sort in _NUMERIC else str(raw or "")
        return (value, *_identity(record))

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string of this query with ``changes``, for links (empty values left out)."""
        values = {
            "q": self.search,
            "role": self.role,
            "instance": self.instance,
            "group": self.group,
            "token_version": self.token_version,
            "sort": self.sort,
            "order": "desc" if self.descending else "asc",
            "limit": str(self.limit),
            "cursor": self.cursor,
        }
        values.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[dict[str, Any]]
    matching: int  # rows that pass the filters, on every page
    matching_clients: int  # of which clients (a bulk disconnect leaves controllers alone unless asked)
    total: int  # rows before filtering
    next_cursor: str = ""
    first: bool = True
    columns: dict[str, bool] = field(default_factory=dict)


def _encode_cursor(key: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, query: ClientQuery) -> tuple[Any, ...] | None:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(raw, list) or len(raw) != 3 or not all(isinstance(v, str) for v in raw[1:]):
        return None
    expected = int if query.sort in _NUMERIC else str
    if not isinstance(raw[0], expected) or isinstance(raw[0], bool):
        return None
    return tuple(raw)


def run_query(records: Iterable[dict[str, Any]], query: ClientQuery) -> Page:
    """One page of ``records`` for ``query``; a cursor that does not parse starts at the first page.

    Only the page is ordered (a heap selection, O(n log page)), never the whole list: the
    first page of 10,000 rows costs one pass over them.
    """
    everything = records if isinstance(records, list) else list(records)
    matching = [r for r in everything if query.matches(r)]
    keyed = [(query.key(r), r) for r in matching]
    after = _decode_cursor(query.cursor, query) if query.cursor else None
    if after is not None:
        keyed = [kr for kr in keyed if (kr[0] < after if query.descending else kr[0] > after)]
    select = heapq.nlargest if query.descending else heapq.nsmallest
    window = select(query.limit + 1, keyed, key=itemgetter(0))
    more = len(window) > query.limit
    window = window[: query.limit]
    return Page(
        rows=[r for _, r in window],
        matching=len(matching),
        matching_clients=sum(1 for r in matching if r.get("role") == "client"),
        total=len(everything),
        next_cursor=_encode_cursor(window[-1][0]) if more else "",
        first=after is None,
        columns={name: any(name in r for r in everything) for name in ("groups", "token_version", "protocol")},
    )


def facets(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Values offered in the filter menus."""
    instances = sorted({str(r.get("instance", "")) for r in records})
    groups = sorted({g for r in records for g in _groups(r)})
    versions = sorted({token_key(r) for r in records if r.get("token_version") is not None})
    return {"instances": instances, "groups": groups, "token_versions": versions}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """The counters at the top of the page."""
    clients = sum(1 for r in records if r.get("role") == "client")
    return {
        "connections": len(records),
        "clients": clients,
        "controllers": len(records) - clients,
        "instances": len({r.get("instance") for r in records}),
        "messages_in": sum(int(r.get("messages_in") or 0) for r in records),
        "messages_out": sum(int(r.get("messages_out") or 0) for r in records),
    }


AUDIT_LIMITS = (50, 100, 500, 1000)


def _utc_epoch(value: str) -> float | None:
    """A ``datetime-local`` value (the page says times are UTC), or an ISO time with its own zone."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """The audit page's filters: action prefix, actor and target (a piece of either, any case), time range."""

    action: str = ""
    actor: str = ""
    target: str = ""
    since: str = ""
    until: str = ""
    limit: int = 100

    @classmethod
    def from_params(cls, params: dict[str, str]) -> AuditQuery:
        try:
            limit = int(params.get("limit", "100"))
        except ValueError:
            limit = 100
        return cls(
            action=params.get("action", "").strip()[:50],
            actor=params.get("actor", "").strip()[:100],
            target=params.get("target", "").strip()[:200],
            since=params.get("since", "").strip()[:40],
            until=params.get("until", "").strip()[:40],
            limit=limit if limit in AUDIT_LIMITS else 100,
        )

    @property
    def active(self) -> bool:
        return bool(self.action or self.actor or self.target or self.since or self.until)

    def select(self, events: Iterable[Any]) -> list[Any]:
        """The newest ``limit`` of ``events`` (newest first) that match; an unreadable time bound is ignored."""
        actor, target = self.actor.casefold(), self.target.casefold()
        since, until = _utc_epoch(self.since) if self.since else None, _utc_epoch(self.until) if self.until else None
        chosen = []
        for event in events:
            if (
                event.action.startswith(self.action)
                and (not actor or actor in event.actor.casefold())
                and (not target or target in str(event.target).casefold())
                and (since is None or event.at >= since)
                and (until is None or event.at <= until)
            ):
                chosen.append(event)
                if len(chosen) >= self.limit:
                    break
        return chosen

    def params(self, **changes: Any) -> dict[str, str]:
        values = {
            "action": self.action,
            "actor": self.actor,
            "target": self.target,
            "since": self.since,
            "until": self.until,
            "limit": str(self.limit),
        }
        values.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in values.items() if v}
