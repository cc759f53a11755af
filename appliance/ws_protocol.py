"""uvicorn's websockets (sans-I/O) protocol, delivering the frames that arrived before a protocol error.

When one read from the socket holds a valid message followed by a frame that breaks the
protocol (over the size limit: 1009; invalid UTF-8: 1007), uvicorn 0.54 closes the
connection without handing the already-parsed message to the app: a client's last good
message was lost silently. Found by the fuzz test of client frames
(``tests/integration/test_fuzz.py``). Here the parsed events are delivered first, then the
connection fails as before, with the same close code.

It also ends the connection's parser when the socket is lost: websockets' parser is a
generator whose frame holds the ``ServerProtocol``, a reference cycle that otherwise keeps
every closed connection's protocol objects until a full garbage collection (rare here:
``appliance/server.py`` tunes the collector for latency).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = ["OrderedWebSocketsProtocol"]


class OrderedWebSocketsProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.handle_events()  # Frames parsed before the error, in order (uvicorn drops them).
        if self.conn.parser_exc is not None:
            self.handle_parser_exception()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.conn.parser.close()  # Nothing parses after this; frees conn by refcounting (see above).
