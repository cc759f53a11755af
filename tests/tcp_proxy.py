"""A TCP forwarder the tests can cut or stall: a network partition between an instance and Redis.

Killing Redis loses its data; a partition keeps Redis (and its keys) up while one
instance cannot reach it, which is what a connection blip looks like in production.
A stall is nastier: connections stay open and nothing flows (a blackholed route, a
frozen VM), so only timeouts and pings can tell.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LoadBalancer", "TcpProxy"]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; :meth:`cut` drops and refuses connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.open = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    await self._flowing.wait()  # Stalled: hold the data, read nothing more, close nothing.
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.target_port)

    def cut(self) -> None:
        """Drop every forwarded connection and refuse new ones (Redis itself stays up)."""
        self.open = False
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

    def stall(self) -> None:
        """Stop forwarding in both directions without closing anything; new connections stall too."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


class LoadBalancer(TcpProxy):
    """Round-robin TCP balancing over several ports, skipping those that refuse (an instance restarting)."""

    def __init__(self, target_ports: list[int]) -> None:
        super().__init__(target_ports[0])
        self.target_ports = target_ports
        self._next = 0

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in range(len(self.target_ports)):
            port = self.target_ports[self._next % len(self.target_ports)]
            self._next += 1
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
        raise OSError("no instance is up")
