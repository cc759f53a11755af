"""Pages of the cluster's presence records, filtered and sorted: ``GET /api/v1/clients`` and the MCP tool."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from litestar.exceptions import ValidationException

__all__ = ["MAX_PAGE", "filter_clients"]

MAX_PAGE = 1000


def _encode_cursor(record: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(f"{record['id']}\x00{record['instance']}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        client_id, instance = raw.split("\x00", 1)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValidationException("cursor is not one this API returned", extra=[{"key": "cursor"}]) from None
    return client_id, instance


def filter_clients(
    records: list[dict[str, Any]],
    *,
    role: str | None = None,
    group: str | None = None,
    prefix: str | None = None,
    limit: int = MAX_PAGE,
    cursor: str | None = None,
) -> dict[str, Any]:
    """One page of presence records, sorted by (id, instance), after the filters."""
    matching = [
        r
        for r in records
        if (role is None or r["role"] == role)
        and (group is None or group in r.get("groups", ()))
        and (prefix is None or r["id"].startswith(prefix))
    ]
    matching.sort(key=lambda r: (r["id"], r["instance"]))
    start = 0
    if cursor:
        after = _decode_cursor(cursor)
        start = next((i for i, r in enumerate(matching) if (r["id"], r["instance"]) > after), len(matching))
    page = matching[start : start + limit]
    more = start + limit < len(matching)
    return {"clients": page, "count": len(matching), "next_cursor": _encode_cursor(page[-1]) if more and page else None}
