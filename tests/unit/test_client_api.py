"""The client library's public surface is deliberate: changing it must be a conscious decision."""

import appliance.client as client
from appliance.core.protocol import CloseCode


def test_public_api_is_pinned():
    assert sorted(client.__all__) == ["BridgeClient", "BridgeClosed", "FINAL_CLOSE_CODES", "IdTaken"]


def test_final_close_codes_are_the_ones_retrying_cannot_fix():
    assert {
        CloseCode.UNAUTHORIZED,
        CloseCode.INVALID_CLIENT_ID,
        CloseCode.RESERVED_ID,
        CloseCode.REPLACED,
        CloseCode.TOKEN_EXPIRED,
        CloseCode.DISCONNECTED,
    } == client.FINAL_CLOSE_CODES


def test_repr_never_shows_the_token():
    assert "tok" not in repr(client.BridgeClient("ws://h", "c1", "tok-secret"))
