"""Leadership among relay replicas: a session-level advisory lock on a connection of its own.

The lock lives and dies with that connection, so a dead leader frees it within seconds;
a leader that lost it without noticing is stopped by Kafka's transactional-id fencing.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


def lock_key(transactional_id: str) -> int:
    """The advisory lock key of a relay: replicas sharing a transactional id contend."""
    digest = hashlib.blake2b(transactional_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Lease:
    """A held lock, and the connection that holds it (the one the relay reads the outbox on)."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    @classmethod
    async def acquire(cls, engine: AsyncEngine, key: int) -> Lease | None:
        """The lease if no other replica holds it, else None (without waiting)."""
        connection = await engine.connect()
        try:
            # Autocommit: each statement ends at once, so this connection never holds
            # back the snapshot xmin the relay reads below, and LISTEN takes effect.
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            held = (await connection.execute(select(func.pg_try_advisory_lock(key)))).scalar()
        except BaseException:
            await connection.invalidate()
            await connection.close()
            raise
        if not held:
            await connection.close()
            return None
        return cls(connection)

    async def listen(self, channel: str, wake: asyncio.Event) -> None:
        """Set `wake` whenever a transaction that wrote outbox rows commits."""
        raw = await self.connection.get_raw_connection()

        def notified(*_: Any) -> None:
            wake.set()

        await raw.driver_connection.add_listener(channel, notified)  # type: ignore[union-attr]

    async def release(self) -> None:
        """Give the lock up by closing its connection: never returned to the pool with the
        lock (or the LISTEN) still on it."""
        await self.connection.invalidate()
        await self.connection.close()
