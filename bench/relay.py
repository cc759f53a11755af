"""The bare reference relay: the thinnest relay that speaks the wire contract.

Every benchmark figure is reported as a ratio to this relay measured in the same
run on the same machine, so the figures say how much the appliance costs over
the floor set by Python, the event loop and the WebSocket framing, not how fast
this particular machine happens to be.

What it does, and nothing more:

- ``GET /ws/{id}`` upgrades to a WebSocket; the ``X-Auth-Token`` header equal to
  the controller token makes the connection a controller, anything else a
  client. No authentication: a wrong token is not refused (the role is all the
  token is used for).
- A controller's ``{"target": id, "message": text}`` is sent to client ``id`` as
  exactly ``text``; a client's text reaches every controller as
  ``{"sender": id, "message": text}`` (compact JSON, like the appliance).
- ``target_offline`` / ``invalid_message`` error frames for the two cases the
  load generator can trigger, so a misrouted command is counted, not silently
  lost.
- ``GET /healthz`` answers 200 so the harness waits for it like for the
  appliance.

No broker, no presence, no rate limits, no pings, no logging: picows on uvloop
in one process. Run it with ``python -m bench.relay --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import msgspec
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

__all__ = ["DEFAULT_CONTROLLER_TOKEN", "serve", "main"]

DEFAULT_CONTROLLER_TOKEN = "bench-controller-token"


class _Command(msgspec.Struct):
    target: str
    message: str


class _Reply(msgspec.Struct):
    sender: str
    message: str


_decode_command = msgspec.json.Decoder(_Command).decode
_encode = msgspec.json.Encoder().encode
_OFFLINE = b'{"error":"target_offline","detail":"target is not connected"}'
_INVALID = b'{"error":"invalid_message","detail":"expected {\\"target\\": id, \\"message\\": text}"}'


class _Relay:
    """Routing tables: one dict of clients by id, one list of controllers."""

    def __init__(self) -> None:
        self.clients: dict[str, WSTransport] = {}
        self.controllers: list[WSTransport] = []


class _ControllerListener(WSListener):
    __slots__ = ("relay",)

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.relay.controllers.append(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            try:
                command = _decode_command(frame.get_payload_as_bytes())
            except msgspec.DecodeError:
                transport.send(WSMsgType.TEXT, _INVALID)
                return
            target = self.relay.clients.get(command.target)
            if target is None:
                transport.send(WSMsgType.TEXT, _OFFLINE)
            else:
                target.send(WSMsgType.TEXT, command.message.encode())
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        try:
            self.relay.controllers.remove(transport)
        except ValueError:
            pass


class _ClientListener(WSListener):
    __slots__ = ("relay", "client_id", "transport")

    def __init__(self, relay: _Relay, client_id: str) -> None:
        self.relay = relay
        self.client_id = client_id
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        old = self.relay.clients.get(self.client_id)
        self.relay.clients[self.client_id] = transport
        if old is not None:  # newest connection wins, as the appliance's default policy
            old.send_close()
            old.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            payload = _encode(_Reply(self.client_id, frame.get_payload_as_utf8_text()))
            for controller in self.relay.controllers:
                controller.send(WSMsgType.TEXT, payload)
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        # Only remove our own entry: a newer connection with the same id may own it.
        if self.relay.clients.get(self.client_id) is transport:
            del self.relay.clients[self.client_id]


async def serve(host: str, port: int, controller_token: str = DEFAULT_CONTROLLER_TOKEN) -> asyncio.Server:
    """Start the relay; returns the listening server (``server.sockets[0]`` has the port)."""
    relay = _Relay()
    health = WSUpgradeResponse.create_ok_response(b"ok")

    def factory(request: WSUpgradeRequest):
        path = request.path.decode()
        if path == "/healthz":
            return WSUpgradeResponseWithListener(health, None)
        if not path.startswith("/ws/") or len(path) <= 4:
            return None  # 404
        client_id = path[4:]
        if request.headers.get("X-Auth-Token") == controller_token:
            return _ControllerListener(relay)
        return _ClientListener(relay, client_id)

    return await ws_create_server(
        factory,
        host,
        port,
        read_buffer_init_size=4096,
        backlog=4096,
    )


async def _main(host: str, port: int, controller_token: str) -> None:
    server = await serve(host, port, controller_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"reference relay listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--controller-token", default=DEFAULT_CONTROLLER_TOKEN)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # uvloop comes with uvicorn[standard]; plain asyncio still works
        asyncio.run(_main(args.host, args.port, args.controller_token))
    else:
        uvloop.run(_main(args.host, args.port, args.controller_token))


if __name__ == "__main__":
    main()
