"""The HTTP API builds its answers as the msgspec Structs its OpenAPI schema is made of, and they lose nothing.

Records come from the real producers (a connection's presence record, a closed connection's
history entry, a client's log of recent commands): encoded through the Structs they must be
the very JSON the plain dicts were.
"""

from __future__ import annotations

import msgspec

from appliance.api import ClientPage, ClientRecord, ErrorBody
from appliance.connections import Connection, Flusher
from appliance.core.history import close_entry
from appliance.core.protocol import ErrorCode, Role
from appliance.core.recent import CommandLog
from appliance.core.session import Limits, Session
from appliance.tokens.base import Grant


async def _send(event):
    pass


def _record(client_id: str, *, v2: bool = False, groups: tuple[str, ...] = (), grant: Grant | None = None) -> dict:
    conn = Connection(
        Session(client_id, Role.CLIENT, Limits(1024, 0, 1), now=1_700_000_000.5),
        _send,
        "10.0.0.1:5",
        Flusher(),
        v2=v2,
        groups=groups,
    )
    conn.grant = grant
    return conn.presence_record("i-1")


def _as_struct_json(value: object, kind: type) -> object:
    return msgspec.json.decode(msgspec.json.encode(msgspec.convert(value, kind)))


def test_client_records_with_history_and_recent_commands_encode_exactly_as_the_dicts():
    log = CommandLog(10, 100)
    log.untracked(1_700_000_001.0, "llm", None, "plain")
    tracked = log.tracked(1_700_000_002.0, "llm", "c-1", "asked", 1_700_000_060.0, object())
    log.answered(tracked, 1_700_000_002.2, "answered")
    log.failed(1_700_000_003.0, "http", "c-2", "lost", "delivery_failed: the client is disconnecting")
    recent = [{**entry, "instance": "i-1"} for entry in log.view(1_700_000_004.0)]
    v1 = _record("plain-v1")
    v2 = _record("rich-v2", v2=True, groups=("red", "blue"), grant=Grant("client", "UNITY_CLIENT_TOKEN", 3))
    history = [
        close_entry(v2, connected_at=1_700_000_000.0, closed_at=1_700_000_009.5, code=None, reason="", by_relay=False)
    ]
    for record in (
        v1,
        v2,
        {**v2, "history": history, "recent_commands": recent},
        {**v1, "history": [], "recent_commands": []},
    ):
        assert _as_struct_json(record, ClientRecord) == record
    page = {"clients": [v1, v2], "count": 2, "next_cursor": None}
    assert _as_struct_json(page, ClientPage) == page


def test_error_bodies_carry_only_what_is_set():
    body = ErrorBody(ErrorCode.TARGET_OFFLINE.value, "x is not connected", "x", history=[], recent_commands=[])
    assert msgspec.json.decode(msgspec.json.encode(body)) == {
        "error": "target_offline",
        "detail": "x is not connected",
        "target": "x",
        "history": [],
        "recent_commands": [],
    }
