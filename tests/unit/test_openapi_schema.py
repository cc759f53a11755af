"""The OpenAPI document says what the HTTP API does: one test per class of mismatch schemathesis found (issue #21).

The document is built in-process from ``create_app`` (no server); the handlers' answers that the document
promises are checked through Litestar's TestClient. tests/integration/test_openapi_fuzz.py runs the fuzzer itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.serialization import encode_json
from litestar.testing import TestClient

from appliance.api import as_result
from appliance.api_types import TARGET_PATTERN, TIMEOUT_MAX_MS, CommandBody
from appliance.app import create_app
from appliance.settings import Settings

ADMIN = "a" * 32
CONTROLLER = "c" * 32
PUBLIC = {"/", "/healthz", "/readyz", "/metrics"}


def _settings() -> Settings:
    return Settings(
        _env_file=None, llm_secret_token=CONTROLLER, unity_client_token="u" * 32, admin_token=ADMIN, instance_id="unit"
    )


@pytest.fixture(scope="module")
def app() -> Litestar:
    return create_app(_settings())


@pytest.fixture(scope="module")
def document(app: Litestar) -> dict[str, Any]:
    return msgspec.json.decode(encode_json(app.openapi_schema.to_schema()))


@pytest.fixture(scope="module")
def client(app: Litestar) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_every_token_checked_route_documents_401_and_403_and_the_public_ones_need_no_token(document):
    for path, method, operation in _operations(document):
        if path in PUBLIC:
            assert operation["security"] == [], (method, path)  # not the document's global requirement
            assert not {"401", "403"} & set(operation["responses"]), (method, path)
        else:
            assert "security" not in operation, (method, path)  # the global X-Auth-Token requirement
            assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}: raises=AUTH_ERRORS (api_schema)"
    assert document["security"] == [{"XAuthToken": []}]


def test_an_invalid_request_is_documented_as_the_422_it_gets_and_400_only_for_a_body_that_is_not_json(document, client):
    for path, method, operation in _operations(document):
        hint = f"{method} {path}: operation_class=ApiOperation, or JsonBodyOperation with a body (api_schema)"
        if operation.get("parameters") or operation.get("requestBody"):
            assert "422" in operation["responses"], hint
        assert ("400" in operation["responses"]) == ("requestBody" in operation), hint
    headers = {"X-Auth-Token": ADMIN}
    assert client.get("/api/v1/clients?limit=0", headers=headers).status_code == 422
    assert client.get("/api/v1/clients/x?history_limit=-1", headers=headers).status_code == 422
    assert client.post("/api/v1/commands", json={"target": "x"}, headers=headers).status_code == 422
    malformed = client.post(
        "/api/v1/commands", content=b"\x00", headers={**headers, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400


def test_an_arbitrary_cursor_is_a_documented_422(document, client):
    operation = document["paths"]["/api/v1/clients"]["get"]
    cursor = next(p for p in operation["parameters"] if p["name"] == "cursor")
    assert "422" in cursor["description"]
    response = client.get("/api/v1/clients?cursor=nonsense", headers={"X-Auth-Token": ADMIN})
    assert (response.status_code, response.json()["extra"]) == (422, [{"key": "cursor"}])


@pytest.mark.parametrize(
    "path", ["/api/v1/clients?limit=1&limit=2", "/api/v1/clients/x?history_limit=1&history_limit=2"]
)
def test_a_repeated_query_parameter_is_refused(client, path):
    response = client.get(path, headers={"X-Auth-Token": ADMIN})
    assert response.status_code == 422
    assert "more than once" in response.json()["detail"]


def test_the_command_body_refuses_in_the_schema_what_the_handler_refuses(document, client):
    body = document["components"]["schemas"]["CommandBody"]
    assert body["additionalProperties"] is False
    target = body["properties"]["target"]
    assert target["minLength"] == 1
    for accepted in ("unity_client_1", "*", "group:red"):
        assert re.fullmatch(target["pattern"], accepted)
    for refused in ("", "bad id!", "group:", "**", "x" * 51):
        assert not re.fullmatch(target["pattern"], refused)
        response = client.post(
            "/api/v1/commands", json={"target": refused, "message": "m"}, headers={"X-Auth-Token": ADMIN}
        )
        assert (response.status_code, response.json()["error"]) == (422, "invalid_target"), refused
    assert target["pattern"] == TARGET_PATTERN
    for field in ("wait_ms", "timeout_ms"):
        limits = body["properties"][field]["oneOf"][0]
        assert (limits["minimum"], limits["maximum"]) == (1, TIMEOUT_MAX_MS)
    too_long = {"target": "x", "message": "m", "wait_ms": TIMEOUT_MAX_MS + 1}
    assert client.post("/api/v1/commands", json=too_long, headers={"X-Auth-Token": ADMIN}).status_code == 422
    # queue takes one client id: if queue is true, the target is a client id (the handler's 422 otherwise).
    assert body["if"] == {"properties": {"queue": {"const": True}}, "required": ["queue"]}
    assert body["then"]["properties"]["target"]["pattern"] == "^[a-zA-Z0-9_-]{1,50}$"
    queued_broadcast = {"target": "*", "message": "m", "queue": True}
    assert client.post("/api/v1/commands", json=queued_broadcast, headers={"X-Auth-Token": ADMIN}).status_code == 422
    ids = body["properties"]["id"]["oneOf"]
    assert ids[0] == {"type": "string", "maxLength": 64, "minLength": 1}
    assert (ids[1]["minimum"], ids[1]["maximum"]) == (-(2**53 - 1), 2**53 - 1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"target":"x","message":"m","extra":1}', type=CommandBody)


def test_examples_are_the_ones_written_not_random_values(document):
    """Litestar's ResponseSpec makes up examples (``"rtt_ms": -440642739952.941``) unless told not to."""
    examples = []
    for _, _, operation in _operations(document):
        for response in operation["responses"].values():
            for media in (response.get("content") or {}).values():
                examples += [example["value"] for example in (media.get("examples") or {}).values()]
                examples += (media.get("schema") or {}).get("examples") or []
    assert examples
    replied = [e for e in examples if isinstance(e, dict) and e.get("status") == "replied"]
    assert replied == [
        {
            "id": "c-1",
            "status": "replied",
            "target": "unity_client_1",
            "sender": "unity_client_1",
            "message": "Moved 10",
            "rtt_ms": 12.5,
        },
        {
            "id": "c-4",
            "status": "replied",
            "target": "group:red",
            "count": 1,
            "replies": [{"client": "unity_client_1", "message": "Moved 10", "rtt_ms": 12.5}],
            "no_reply": [],
        },
    ]
    # The same document twice: nothing is drawn at random.
    again = create_app(_settings()).openapi_schema.to_schema()
    assert msgspec.json.decode(encode_json(again)) == document


def test_503s_are_documented_and_operation_ids_read_as_function_names(document):
    ids = {(method, path): operation["operationId"] for path, method, operation in _operations(document)}
    assert ids[("post", "/api/v1/commands")] == "sendCommand"
    assert ids[("get", "/api/v1/clients")] == "listClients"
    assert ids[("get", "/api/v1/clients/{client_id}")] == "getClient"
    assert ids[("delete", "/api/v1/clients/{client_id}")] == "disconnectClient"
    assert ids[("get", "/api/v1/events")] == "followEvents"  # from the handler's name: follow_events
    assert ids[("get", "/api/v1/commands/{command_id}")] == "getCommand"
    follow_up = document["paths"]["/api/v1/commands/{command_id}"]["get"]["parameters"]
    wait = next(p for p in follow_up if p["name"] == "wait_ms")["schema"]
    assert (wait["minimum"], wait["maximum"]) == (0, 300_000)
    for (method, path), operation_id in ids.items():
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", operation_id), (method, path, operation_id)
    for method, path in [
        ("post", "/api/v1/commands"),
        ("get", "/api/v1/clients"),
        ("get", "/api/v1/clients/{client_id}"),
    ]:
        assert "503" in document["paths"][path][method]["responses"], (method, path)  # broker_unavailable


def test_a_204_has_no_body(document):
    for path in ("/api/v1/clients/{client_id}", "/api/v1/bans"):
        assert document["paths"][path]["delete"]["responses"]["204"].get("content") is None, path


def test_options_lists_every_method_of_a_path(client):
    assert client.options("/api/v1/clients/x").headers["allow"] == "DELETE, GET, OPTIONS"
    assert client.options("/api/v1/commands").headers["allow"] == "OPTIONS, POST"
    assert client.options("/api/v1/bans").headers["allow"] == "DELETE, GET, OPTIONS, POST"


def test_outcomes_become_the_documented_structs_and_encode_as_the_service_wrote_them():
    bodies = [
        {"id": "c-1", "status": "replied", "target": "u", "sender": "u", "message": "ok", "rtt_ms": 1.5},
        {"id": 7, "status": "delivered", "target": "*", "count": 4},
        {
            "id": 8,
            "status": "delivered",
            "target": "group:red",
            "count": 2,
            "replies": [{"client": "a", "message": "ok", "rtt_ms": 3.5}],
            "no_reply": ["b"],
            "replayed": True,
        },
        {"id": "q", "status": "queued", "target": "u", "expires_in_ms": 30000, "duplicate": True, "replayed": True},
        {"id": "t", "status": "timeout", "target": "u", "detail": "u did not reply in time", "replayed": True},
        {"id": "t", "status": "timeout", "target": "u", "delivered": True, "detail": "follow it up", "replayed": True},
        {"error": "target_offline", "detail": "u is not connected", "target": "u", "id": "c-2"},
        {"error": "rate_limited", "detail": "too many commands; retry later", "retry_after_ms": 250},
        {"error": "message_too_large", "detail": "message exceeds 10 bytes", "limit": 10},
    ]
    for body in bodies:
        assert msgspec.json.encode(as_result(body)) == msgspec.json.encode(body)


def test_a_client_that_is_not_connected_gets_the_typed_404_with_its_history(client, document):
    response = client.get("/api/v1/clients/nobody", headers={"X-Auth-Token": ADMIN})
    assert response.status_code == 404
    assert response.json() == {
        "error": "target_offline",
        "detail": "nobody is not connected",
        "target": "nobody",
        "history": [],
        "recent_commands": [],
    }
    error_body = document["components"]["schemas"]["ErrorBody"]["properties"]
    assert error_body["history"]["oneOf"][0]["items"] == {"$ref": "#/components/schemas/HistoryEntry"}
    assert error_body["recent_commands"]["oneOf"][0]["items"] == {"$ref": "#/components/schemas/RecentCommand"}


def test_a_404_with_history_is_the_json_the_dicts_were():
    from appliance.api_types import ErrorBody, HistoryEntry, RecentCommand
    from appliance.connections import Connection, Flusher
    from appliance.core.history import close_entry
    from appliance.core.protocol import Role
    from appliance.core.recent import CommandLog
    from appliance.core.session import Limits, Session

    async def send(event: object) -> None:
        pass

    conn = Connection(Session("u", Role.CLIENT, Limits(1024, 0, 1), now=1_700_000_000.5), send, "10.0.0.1:5", Flusher())
    history = [
        close_entry(
            conn.presence_record("i-1"), connected_at=1.0, closed_at=2.5, code=1000, reason="bye", by_relay=True
        )
    ]
    log = CommandLog(10, 100)
    log.untracked(1_700_000_001.0, "llm", None, "plain")
    recent = [{**entry, "instance": "i-1"} for entry in log.view(1_700_000_004.0)]
    as_dicts = {"error": "target_offline", "detail": "u is not connected", "target": "u"}
    as_dicts |= {"history": history, "recent_commands": recent}
    typed = ErrorBody(
        "target_offline",
        "u is not connected",
        "u",
        history=msgspec.convert(history, list[HistoryEntry]),
        recent_commands=msgspec.convert(recent, list[RecentCommand]),
    )
    # The same JSON (test_api_structs.py's measure: the Structs' field order may differ from the dicts').
    assert msgspec.json.decode(msgspec.json.encode(typed)) == as_dicts


def test_the_idempotency_key_header_is_documented_with_its_bounds(document, client):
    post = document["paths"]["/api/v1/commands"]["post"]
    (header,) = [p for p in post["parameters"] if p["in"] == "header" and p["name"] == "Idempotency-Key"]
    assert header["required"] is False
    assert header["schema"]["minLength"] == 1
    too_long = "k" * (header["schema"]["maxLength"] + 1)
    answer = client.post(
        "/api/v1/commands",
        json={"target": "nobody", "message": "x"},
        headers={"X-Auth-Token": CONTROLLER, "Idempotency-Key": too_long},
    )
    assert answer.status_code == 422, answer.text
