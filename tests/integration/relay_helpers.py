"""Helpers of the relay tests: outbox rows written directly, the downstream topics read back
by a read_committed consumer, and relay processes that can be killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from sync_service.config import Settings
from sync_service.connections import kafka
from sync_service.events.change import Entity, Source
from sync_service.events.outbound import downstream_event_id, event_type, outbound_value
from sync_service.kafka import ensure_topics
from sync_service.pipeline.decode import change_from_envelope
from sync_service.pipeline.write import OUTBOX_CHANNEL
from tests.factories import order_event, user_event
from tests.integration.harness import as_environment

OUT_PARTITIONS = 3
INSERT_OUTBOX = text(
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, event_id, version, payload)"
    " VALUES (:aggregate_type, :aggregate_id, :event_type, :event_id, :version,"
    " CAST(:payload AS json))"
)
NOTIFY = text("SELECT pg_notify(:channel, '')").bindparams(channel=OUTBOX_CHANNEL)
SYNC_SERVICE = Path(sys.executable).with_name("sync-service")


async def create_out_topics(settings: Settings, partitions: int = OUT_PARTITIONS) -> None:
    await ensure_topics(
        settings,
        {settings.out_users_topic: partitions, settings.out_orders_topic: partitions},
    )


def outbox_row(entity: Entity, entity_id: int, version: int) -> dict[str, Any]:
    """The outbox row the writer stores for an upsert of `entity_id` at `version`."""
    envelope = (
        user_event(entity_id, version) if entity == "user" else order_event(entity_id, 1, version)
    )
    change = change_from_envelope(entity, envelope, Source(f"cdc.{entity}s", 0, version))
    assert change.row is not None
    row = {**change.row, "version": version, "deleted_at": None}
    return {
        "aggregate_type": entity,
        "aggregate_id": str(entity_id),
        "event_type": event_type(change),
        "event_id": downstream_event_id(change.event_id),
        "version": version,
        "payload": orjson.dumps(outbound_value(change, row), default=str).decode(),
    }


async def insert_outbox(connection: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` and notify the relay, in the caller's transaction (as the writer does)."""
    await connection.execute(INSERT_OUTBOX, list(rows))
    await connection.execute(NOTIFY)


@dataclass(frozen=True, slots=True)
class Published:
    """One downstream record as a read_committed consumer sees it."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: dict[str, Any]
    headers: dict[str, bytes]
    timestamp_ms: int
    raw_value: bytes

    @property
    def event_id(self) -> str:
        return str(self.value["event_id"])


class Downstream:
    """Reads both downstream topics from the start, read_committed, in the background."""

    def __init__(self, settings: Settings) -> None:
        self._consumer = _reader(settings, "read_committed")
        self._partitions = _partitions(settings)
        self.records: list[Published] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Downstream:
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _poll(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200)
            for tp, records in fetched.items():
                self.records.extend(
                    Published(tp.topic, tp.partition, r.offset, r.key, orjson.loads(r.value),
                              dict(r.headers), r.timestamp, r.value)
                    for r in records
                )  # fmt: skip
            self._arrived.set()

    async def wait_for(self, count: int, patience_s: float = 60.0) -> None:
        """Until `count` records arrived, or `patience_s` passed: then the caller's exact
        checks say what is missing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience_s):
                while len(self.records) < count:
                    self._arrived.clear()
                    await self._arrived.wait()

    async def drain(self, patience_s: float = 30.0) -> list[Published]:
        """Everything committed so far: reads up to the last stable offset of every partition."""
        consumer = self._consumer
        deadline = time.monotonic() + patience_s
        ends = await consumer.end_offsets(self._partitions)
        for tp in self._partitions:
            while await consumer.position(tp) < ends[tp]:
                assert time.monotonic() < deadline, f"{tp} not read to {ends[tp]}"
                await asyncio.sleep(0.05)
        return list(self.records)


def assert_exactly_once(published: Iterable[Published], expected: Iterable[object]) -> None:
    """Each expected event id exactly once, and nothing else."""
    seen = Counter(p.event_id for p in published)
    wanted = Counter(str(e) for e in expected)
    missing = wanted - seen
    extra = seen - wanted
    assert not missing, f"{sum(missing.values())} missing, e.g. {list(missing)[:3]}"
    assert not extra, f"{sum(extra.values())} duplicate or unexpected, e.g. {list(extra)[:3]}"


def assert_version_order(published: Iterable[Published]) -> None:
    """Per key, versions strictly increase in the order a consumer reads them."""
    by_key: dict[tuple[str, bytes], list[tuple[int, int]]] = defaultdict(list)
    for p in published:
        by_key[p.topic, p.key].append((p.offset, int(p.value["version"])))
    for key, entries in by_key.items():
        versions = [version for _, version in sorted(entries)]
        assert versions == sorted(set(versions)), f"{key}: versions out of order {versions}"


class TransactionProbe:
    """Tells whether a Kafka transaction is open on the downstream topics right now: a
    partition's high watermark is then above its last stable offset."""

    def __init__(self, settings: Settings) -> None:
        self._partitions = _partitions(settings)
        self._committed = _reader(settings, "read_committed")
        self._uncommitted = _reader(settings, "read_uncommitted")

    async def __aenter__(self) -> TransactionProbe:
        for consumer in (self._committed, self._uncommitted):
            await consumer.start()
            consumer.assign(self._partitions)
        return self

    async def __aexit__(self, *_: object) -> None:
        for consumer in (self._committed, self._uncommitted):
            await consumer.stop()

    async def open(self) -> bool:
        stable = await self._committed.end_offsets(self._partitions)
        written = await self._uncommitted.end_offsets(self._partitions)
        return any(written[tp] > stable[tp] for tp in self._partitions)


async def count_uncommitted(settings: Settings) -> int:
    """How many records the downstream topics hold, aborted transactions included."""
    consumer = _reader(settings, "read_uncommitted")
    partitions = _partitions(settings)
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        total = 0
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                fetched = await consumer.getmany(tp, timeout_ms=500)
                total += sum(1 for r in fetched.get(tp, []) if r.offset < ends[tp])
        return total
    finally:
        await consumer.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """`sync-service relay` in a process of its own, with the test's settings."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.port = free_port()
        self._env = {**os.environ, **_env(settings), "SYNC_HTTP_PORT": str(self.port)}
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self._log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(SYNC_SERVICE), "relay", env=self._env, stdout=log, stderr=log
            )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, signal.SIGKILL)
        await self._process.wait()

    def pause(self, paused: bool) -> None:
        """SIGSTOP (or SIGCONT): the process stands still wherever it is."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    async def terminate(self) -> int:
        assert self._process is not None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self._process.wait(), timeout=30)

    async def active(self) -> bool | None:
        """Whether it reports holding the relay lease; None while it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"http://127.0.0.1:{self.port}/metrics") as response,
            ):
                body = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return "sync_relay_active 1.0" in body.splitlines()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def relay_processes(
    settings: Settings, directory: Path, count: int
) -> AsyncIterator[list[RelayProcess]]:
    """`count` relay processes (not started); any still running at the end is killed."""
    processes = [RelayProcess(settings, directory / f"relay-{i}.log") for i in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            if process.running:
                await process.kill()


def _reader(settings: Settings, isolation_level: str) -> AIOKafkaConsumer:
    return kafka.consumer(
        settings,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )


def _partitions(settings: Settings) -> list[TopicPartition]:
    return [
        TopicPartition(topic, p)
        for topic in (settings.out_users_topic, settings.out_orders_topic)
        for p in range(OUT_PARTITIONS)
    ]


def _env(settings: Settings) -> dict[str, str]:
    return as_environment(settings)
