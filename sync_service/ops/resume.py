"""`sync-service dlq resume`: let the consumers read a partition that the dead-letter
guard paused, once its upstream is fixed.

The guard's window starts again at the partition's stored position: the letters that
tripped it stay in the store (to re-drive or purge) but no longer count, so the guard
trips again only if the upstream is still broken. A running consumer of the partition
notices within seconds and reads on from its stored position.
"""

from __future__ import annotations

from sqlalchemy import Table, func, select, update

from sync_service.config import Settings
from sync_service.db.models import ConsumerOffset, PartitionGuard
from sync_service.errors import UserError
from sync_service.ops import audit
from sync_service.service import connect

_GUARDS: Table = PartitionGuard.__table__  # type: ignore[assignment]


async def resume(settings: Settings, topic: str, partition: int) -> str:
    """Clear the guard's pause of (group, topic, partition). Returns one line."""
    engine = await connect(settings)
    try:
        async with engine.begin() as connection:
            mine = (_GUARDS.c.group_id == settings.group_id,)
            held = (
                await connection.execute(
                    select(_GUARDS.c.topic, _GUARDS.c.partition)
                    .where(*mine, _GUARDS.c.paused_at.is_not(None))
                    .order_by(_GUARDS.c.topic, _GUARDS.c.partition)
                    .with_for_update()
                )
            ).all()
            if (topic, partition) not in held:
                paused = ", ".join(f"{t}[{p}]" for t, p in held) or "none is"
                raise UserError(
                    f"{topic}[{partition}] is not paused by the dead-letter guard for group "
                    f"{settings.group_id} (paused: {paused})"
                )
            position = await connection.scalar(
                select(ConsumerOffset.next_offset).where(
                    ConsumerOffset.group_id == settings.group_id,
                    ConsumerOffset.topic == topic,
                    ConsumerOffset.partition == partition,
                )
            )
            await connection.execute(
                update(_GUARDS)
                .where(*mine, _GUARDS.c.topic == topic, _GUARDS.c.partition == partition)
                .values(paused_at=None, resumed_at=func.now(), window_from=position or 0)
            )
            line = (
                f"resumed {topic}[{partition}] at offset {position or 0}: the dead-letter "
                "guard counts from there; a running consumer reads on within seconds"
            )
            arguments = {"topic": topic, "partition": partition}
            await audit.record(connection, settings, "dlq resume", arguments, line)
    finally:
        await engine.dispose()
    return line
