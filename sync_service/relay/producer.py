"""The transactional producer: a chunk of events and the position after it commit to Kafka
together, or neither does.

A producer that failed in any way is dropped, never reused: the next one, started with
the same transactional id, aborts whatever transaction the failed one left open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.relay.outbox import Message
from sync_service.relay.partition import partition_index

log = logging.getLogger(__name__)

_MAX_BATCH_BYTES = 512 * 1024
"""Per partition and request: a chunk of a few thousand events goes in a few requests."""
_stopping: set[asyncio.Task[None]] = set()


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """Idempotent and transactional (acks=all); replicas share the transactional id, so
    the one that starts last fences the others."""
    return kafka.producer(
        settings,
        client_id=f"{settings.relay_transactional_id}-producer",
        transactional_id=settings.relay_transactional_id,
        enable_idempotence=True,
        acks="all",
        max_batch_size=_MAX_BATCH_BYTES,
    )


async def publish(producer: AIOKafkaProducer, messages: Sequence[Message]) -> None:
    """Send `messages` in one Kafka transaction, in order within each partition.

    Records go out as whole batches per partition (the key's partition by Kafka's default
    murmur2 rule, as any client computes it), which costs far less per record than
    `send`. Not `async with producer.transaction()`: on an error it aborts, which waits
    for the broker, possibly forever; here a failure simply propagates and the caller
    drops the producer. Every batch is awaited before the commit, so that a record that
    failed can never be left out of a transaction that commits."""
    await producer.begin_transaction()
    partitions: dict[str, list[int]] = {}
    # Per topic, the open batch of each partition (by index in `partitions`).
    open_batches: dict[str, list[BatchBuilder | None]] = {}
    sent: list[asyncio.Future[object]] = []
    for topic, key, value, headers in messages:
        batches = open_batches.get(topic)
        if batches is None:
            partitions[topic] = sorted(await producer.partitions_for(topic))
            batches = open_batches[topic] = [None] * len(partitions[topic])
        # A record without a key (only a dead letter's can be) goes to the first partition.
        index = 0 if key is None else partition_index(key, len(batches))
        batch = batches[index]
        if batch is None:
            batch = batches[index] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            sent.append(await producer.send_batch(batch, topic, partition=partitions[topic][index]))
            batch = batches[index] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None, headers=headers)
    for topic, batches in open_batches.items():
        for partition, batch in zip(partitions[topic], batches, strict=True):
            if batch is not None:
                sent.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*sent)
    await producer.commit_transaction()


async def stop_producer(producer: AIOKafkaProducer, grace_s: float = 10.0) -> None:
    """Stop `producer`, waiting at most `grace_s`. An idempotent producer retries its
    batches until the broker answers, and `stop` waits for them; past the grace period it
    finishes in the background (its batches are then rejected as fenced)."""
    task = asyncio.create_task(producer.stop())
    done, _ = await asyncio.wait({task}, timeout=grace_s)
    if done:
        task.result()
        return
    log.warning("the Kafka producer did not stop within %.0fs; it finishes in the background",
                grace_s)  # fmt: skip
    _stopping.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Task[None]) -> None:
    _stopping.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("background producer stop failed", exc_info=task.exception())
