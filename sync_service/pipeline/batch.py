"""Gather decoded records into a batch, bounded by count and by age.

A batch carries, per partition, the *next* offset after its last record: what becomes
the stored position once the batch's transaction commits, and never more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sync_service.events.change import Change, DeadLetter, Skipped

TopicPartition = tuple[str, int]


@dataclass(slots=True)
class Batch:
    """The unit of work: everything in it commits together or not at all."""

    changes: list[Change] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    """Records that hold no change (tombstones): they only move the positions."""
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    opened_at: float = 0.0
    sweep: bool = False
    """Also retry the oldest waiting changes of the owned partitions."""

    def __len__(self) -> int:
        return len(self.changes) + len(self.dead) + len(self.skipped)


class BatchBuilder:
    """Accumulates records until `max_events` or until the oldest is `max_wait_s` old."""

    def __init__(self, max_events: int, max_wait_s: float) -> None:
        self._max_events = max_events
        self._max_wait_s = max_wait_s
        self._batch = Batch()

    def add(self, item: Change | DeadLetter | Skipped, now: float) -> None:
        # Runs once per consumed record: locals, no `len(batch)` or `max()` calls.
        batch = self._batch
        if not batch.changes and not batch.dead and not batch.skipped:
            batch.opened_at = now
        if isinstance(item, Change):
            batch.changes.append(item)
        elif isinstance(item, DeadLetter):
            batch.dead.append(item)
        else:
            batch.skipped.append(item)
        topic, partition, offset = item.source
        tp = (topic, partition)
        offsets = batch.next_offsets
        if offsets.get(tp, 0) <= offset:
            offsets[tp] = offset + 1

    def __len__(self) -> int:
        return len(self._batch)

    def full(self) -> bool:
        return len(self._batch) >= self._max_events

    def due(self, now: float) -> bool:
        """Full, or holding records that have waited long enough."""
        batch = self._batch
        return self.full() or (len(batch) > 0 and now - batch.opened_at >= self._max_wait_s)

    def take(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        return batch

    def drop(self, partitions: set[TopicPartition]) -> None:
        """Forget buffered records of partitions this consumer no longer owns."""
        kept = self.take()
        items: list[Change | DeadLetter | Skipped] = [*kept.changes, *kept.dead, *kept.skipped]
        for item in items:
            if (item.source.topic, item.source.partition) not in partitions:
                self.add(item, kept.opened_at)
