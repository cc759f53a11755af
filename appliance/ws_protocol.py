"""uvicorn's websockets (sans-I/O) protocol, delivering the frames that arrived before a protocol error.

When one read from the socket holds a valid message followed by a frame that breaks the
protocol (over the size limit: 1009; invalid UTF-8: 1007), uvicorn 0.54 closes the
connection without handing the already-parsed message to the app: a client's last good
message was lost silently. Found by the fuzz test of client frames
(``tests/integration/test_fuzz.py``). Here the parsed events are delivered first, then the
connection fails as before, with the same close code.
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
