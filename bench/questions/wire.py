"""The wire: rows, bytes and round trips as PostgreSQL sends them, counted by a proxy in
front of the server, and statements counted at the engine.

Invariant: the proxy adds a hop, so it counts and never times.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass
class Wire:
    """What crossed a counting proxy: bytes each way, the server's DataRow messages (rows)
    and its ReadyForQuery messages (one per completed request: round trips)."""

    bytes_to_server: int = 0
    bytes_to_client: int = 0
    rows: int = 0
    round_trips: int = 0

    def since(self, before: Wire) -> Wire:
        return Wire(
            self.bytes_to_server - before.bytes_to_server,
            self.bytes_to_client - before.bytes_to_client,
            self.rows - before.rows,
            self.round_trips - before.round_trips,
        )


class BackendMessages:
    """Splits the server's stream into protocol messages (a type byte, then an int32 length
    that counts itself), wherever TCP cut it. The connection must not use TLS, so that the
    server's first byte already starts a message."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        at = 0
        while len(self._buffer) - at >= 5:
            length = int.from_bytes(self._buffer[at + 1 : at + 5], "big")
            if len(self._buffer) - at < 1 + length:
                break
            kind = self._buffer[at]
            if kind == ord("D"):
                self._wire.rows += 1
            elif kind == ord("Z"):
                self._wire.round_trips += 1
            at += 1 + length
        del self._buffer[:at]


class WireProxy:
    """A TCP proxy on 127.0.0.1 in front of the server, counting into `wire`. It adds a hop,
    so it is used to count, never to time."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self.wire = Wire()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        server_in, server_out = await asyncio.open_connection(*self._upstream)
        messages = BackendMessages(self.wire)

        async def to_server() -> None:
            while chunk := await client_in.read(65_536):
                self.wire.bytes_to_server += len(chunk)
                server_out.write(chunk)
                await server_out.drain()

        async def to_client() -> None:
            while chunk := await server_in.read(65_536):
                self.wire.bytes_to_client += len(chunk)
                messages.feed(chunk)
                client_out.write(chunk)
                await client_out.drain()

        async def pump(
            direction: Callable[[], Awaitable[None]], sink: asyncio.StreamWriter
        ) -> None:
            with contextlib.suppress(OSError):
                await direction()
            sink.close()  # one side hung up: so does the other

        await asyncio.gather(pump(to_server, server_out), pump(to_client, client_out))


@contextlib.asynccontextmanager
async def counting(url: str) -> AsyncIterator[tuple[str, WireProxy]]:
    """A URL that reaches the database through a counting proxy, without TLS."""
    parsed = make_url(url)
    proxy = WireProxy(parsed.host or "localhost", parsed.port or 5432)
    port = await proxy.start()
    try:
        yield parsed.set(host="127.0.0.1", port=port).render_as_string(hide_password=False), proxy
    finally:
        await proxy.stop()


NO_TLS: Final = {"ssl": False}


class Statements:
    """Counts the statements an engine sends (before_cursor_execute)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1
