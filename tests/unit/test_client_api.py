"""The client library's public surface is deliberate: changing it must be a conscious decision."""

import appliance.client as client
from appliance.core.protocol import CloseCode


def test_public_api_is_pinned():
    assert sorted(client.__all__) == ["BridgeClient", "BridgeClosed", "FINAL_CLOSE_CODES", "Handler", "IdTaken"]


def test_final_close_codes_are_the_ones_retrying_cannot_fix():
    assert {
        CloseCode.UNAUTHORIZED,
        CloseCode.INVALID_CLIENT_ID,
        CloseCode.RESERVED_ID,
        CloseCode.REPLACED,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.DISCONNECTED,
        CloseCode.GROUP_NOT_ALLOWED,
        CloseCode.BANNED,
    } == client.FINAL_CLOSE_CODES


def test_every_close_code_the_protocol_calls_final_is_final_for_the_client():
    """docs/protocol.md's close-code table says, per code, whether retrying can help."""
    import re
    from pathlib import Path

    table = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    final = {int(code) for code, retry in re.findall(r"^\| (4\d{3}) \|.*\| (not?\b[^|]*)\|$", table, re.M)}
    assert 4012 in final and final <= {int(code) for code in client.FINAL_CLOSE_CODES}


def test_repr_never_shows_the_token():
    assert "tok" not in repr(client.BridgeClient("ws://h", "c1", "tok-secret"))


async def test_request_to_many_clients_is_refused_before_anything_is_sent():
    """HttpController.request("*", ...) once delivered to every client, then raised code="delivered"."""
    import pytest

    from appliance.controller import Controller, HttpController, InvalidCommand

    # Neither URL is listened on: the refusal comes before any connection.
    async with HttpController("http://127.0.0.1:9", "t") as api:
        for target in ("*", "group:red"):
            with pytest.raises(InvalidCommand, match="names many"):
                await api.request(target, "go")
    with pytest.raises(InvalidCommand, match="names many"):
        await Controller("ws://127.0.0.1:9", "llm-a", "t").request("*", "go")
