"""Several `sync-service` processes on one group, a steady stream into their topics, and
the stored positions sampled from outside: what the group-change measurements
(`python -m bench.groups`) and the fault suite (tests/integration/faults/) drive.

Invariant: progress is what PostgreSQL shows (`consumer_offsets`), never a process's word;
every process started here is stopped (or killed) when its `Fleet` closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from sync_service.ops.traffic import Traffic

TP = tuple[str, int]
SYNC_SERVICE = Path(sys.executable).with_name("sync-service")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The caller's environment with every setting of `settings` as `SYNC_*`."""
    own = {
        f"SYNC_{name.upper()}": str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }
    return {**os.environ, **own, **extra}


class Replica:
    """One `sync-service <role>` process; restartable under the same name (and, when the
    fleet is static, the same `SYNC_INSTANCE_ID`)."""

    def __init__(self, name: str, role: str, env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.role = role
        self.port = free_port()
        self._env = {**env, "SYNC_HTTP_PORT": str(self.port)}
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert not self.running, f"{self.name} runs already"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.process = await asyncio.create_subprocess_exec(
                str(SYNC_SERVICE), self.role, env=self._env, stdout=out, stderr=out
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    async def kill(self) -> None:
        """SIGKILL, as a crash: no cleanup of any kind."""
        if self.running:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()

    async def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a pod; the exit code."""
        assert self.process is not None
        if self.running:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def ready(self) -> bool:
        """`/readyz` answers 200 (for a consumer: it owns partitions)."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"http://127.0.0.1:{self.port}/readyz") as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of metric `name` (with `labels`) it exports; None while
        it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(f"http://127.0.0.1:{self.port}/metrics") as response,
            ):
                body = await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        total = 0.0
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Fleet:
    """Consume replicas (and optionally a relay) on one group. `static` gives each replica
    the instance id `<group>-<name>`, kept across restarts, as a StatefulSet's pod name."""

    def __init__(
        self, settings: Settings, logs: Path, *, consumers: int, relay: bool, static: bool
    ) -> None:
        self.settings = settings
        self.static = static
        self.replicas: list[Replica] = []
        self._logs = logs
        self._generation = 0
        for i in range(consumers):
            self.replicas.append(self._replica(f"consume-{i}"))
        self.relay = (
            Replica("relay", "relay", service_env(settings), logs / "relay.log") if relay else None
        )

    def _replica(self, name: str) -> Replica:
        extra = {"SYNC_INSTANCE_ID": f"{self.settings.group_id}-{name}"} if self.static else {}
        return Replica(
            name, "consume", service_env(self.settings, **extra), self._logs / f"{name}.log"
        )

    async def start(self) -> None:
        for replica in self.all:
            await replica.start()

    @property
    def all(self) -> list[Replica]:
        return [*self.replicas, *([self.relay] if self.relay else [])]

    async def replace(self, index: int) -> Replica:
        """A new replica in place of `replicas[index]` (which must have exited): the same
        name and instance id when static, a new name (a new pod) when not."""
        old = self.replicas[index]
        assert not old.running
        if self.static:
            replica = old
        else:
            self._generation += 1
            replica = self._replica(f"{old.name.split('.')[0]}.{self._generation}")
            self.replicas[index] = replica
        await replica.start()
        return replica

    async def close(self) -> None:
        for replica in self.all:
            if replica.running:
                with contextlib.suppress(TimeoutError):
                    await replica.terminate(timeout_s=30)
            await replica.kill()

    def tails(self) -> str:
        return "\n".join(f"== {r.name} ==\n{r.tail()}" for r in self.all)


@contextlib.asynccontextmanager
async def fleet(
    settings: Settings, logs: Path, *, consumers: int = 3, relay: bool = False, static: bool = False
) -> AsyncIterator[Fleet]:
    """A started `Fleet`, closed (every process stopped) when the block ends."""
    group = Fleet(settings, logs, consumers=consumers, relay=relay, static=static)
    try:
        await group.start()
        yield group
    finally:
        await group.close()


async def wait_for(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Poll the async `check()` every 0.1 s until it holds, else fail naming `what`."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within_s:.0f} s")
        await asyncio.sleep(0.1)


# --- the stream --------------------------------------------------------------------------------


@dataclass
class Stream:
    """A seeded `Traffic` history produced at a steady rate (events per second)."""

    traffic: Traffic
    events: int
    rate: float
    sent: dict[TP, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def produce(self, settings: Settings) -> None:
        topics = {"user": settings.users_topic, "order": settings.orders_topic}
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            linger_ms=10,
            enable_idempotence=True,
            request_timeout_ms=120_000,
        )
        await _retry_start(producer)
        tick = 0.05
        per_tick = max(1, round(self.rate * tick))
        started = time.monotonic()
        try:
            for i, event in enumerate(self.traffic.events(self.events)):
                topic = topics[event.entity]
                await producer.send(topic, event.value, key=event.key, partition=event.partition)
                self.sent[(topic, event.partition)] = self.sent.get((topic, event.partition), 0) + 1
                if (i + 1) % per_tick == 0:
                    await producer.flush()
                    lag = started + (i + 1) / self.rate - time.monotonic()
                    if lag > 0:
                        await asyncio.sleep(lag)
            await producer.flush()
        finally:
            await producer.stop()
            self.done.set()


async def _retry_start(producer: AIOKafkaProducer, attempts: int = 30) -> None:
    for attempt in range(attempts):
        try:
            await producer.start()
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1)


# --- progress, from outside -------------------------------------------------------------------


@dataclass
class Sampler:
    """The group's stored positions every `every_s`, with the time they were read."""

    engine: AsyncEngine
    group_id: str
    every_s: float = 0.1
    samples: list[tuple[float, dict[TP, int]]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        query = text(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = :g"
        )
        while not stop.is_set():
            try:
                async with self.engine.connect() as connection:
                    found = await connection.execute(query, {"g": self.group_id})
                    self.samples.append((time.monotonic(), {(t, p): n for t, p, n in found}))
            except Exception:  # the server may be down in a fault scenario: a gap
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    def total(self) -> int:
        return sum(self.samples[-1][1].values()) if self.samples else 0

    def advances(self, partitions: Iterable[TP] | None = None) -> list[float]:
        """When any of `partitions` (all when None) was seen to advance."""
        wanted = None if partitions is None else set(partitions)
        times: list[float] = []
        last: dict[TP, int] = {}
        for at, positions in self.samples:
            moved = False
            for tp, n in positions.items():
                if (wanted is None or tp in wanted) and n > last.get(tp, -1):
                    moved = moved or tp in last
                    last[tp] = n
            if moved:
                times.append(at)
        return times

    def longest_stop(
        self, start: float, end: float, partitions: Iterable[TP] | None = None
    ) -> float:
        """The longest time within [start, end] in which none of `partitions` advanced."""
        times = [t for t in self.advances(partitions) if start <= t <= end]
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))

    def stopped_time(self, start: float, end: float, over_s: float = 1.0,
                     partitions: Iterable[TP] | None = None) -> float:  # fmt: skip
        """Time within [start, end] spent in stops longer than `over_s` (no partition of
        `partitions` advancing): the stop-the-world time, beside the normal cadence."""
        times = [t for t in self.advances(partitions) if start <= t <= end]
        edges = [start, *times, end]
        return sum(b - a for a, b in itertools.pairwise(edges) if b - a > over_s)


# --- catching a replica mid-batch ---------------------------------------------------------------


async def in_transaction(engine: AsyncEngine, pid: int) -> tuple[int, Any] | None:
    """The backend (pid, xact_start) of a writing transaction that process `pid` has open
    (a batch: its fence's row locks gave it a transaction id)."""
    try:
        ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")}
    except psutil.Error:
        return None
    async with engine.connect() as connection:
        found = await connection.execute(
            text(
                "SELECT pid, xact_start, client_port FROM pg_stat_activity"
                " WHERE backend_xid IS NOT NULL AND backend_type = 'client backend'"
                " AND state IN ('active', 'idle in transaction')"
            )
        )
        for backend, started, port in found:
            if port in ports:
                return int(backend), started
    return None


async def pause_mid_batch(engine: AsyncEngine, pid: int, tries: int = 500) -> None:
    """SIGSTOP process `pid` while one of its transactions is open (checked after)."""
    for _ in range(tries):
        open_before = await in_transaction(engine, pid)
        if open_before is None:
            await asyncio.sleep(0.005)
            continue
        psutil.Process(pid).send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.2)
        async with engine.connect() as connection:
            still = await connection.scalar(
                text("SELECT xact_start FROM pg_stat_activity WHERE pid = :p"),
                {"p": open_before[0]},
            )
        if still == open_before[1]:
            return
        psutil.Process(pid).send_signal(signal.SIGCONT)
    raise RuntimeError("never caught the replica inside a transaction")


_PARTITION = re.compile(r"([A-Za-z0-9._-]+)\[(\d+)\]")


def assigned_partitions(log: Path) -> set[TP]:
    """The partitions a consumer's log says it was last assigned (the text format's
    `assigned N partitions partitions=t[0],t[1]`)."""
    last = ""
    for line in log.read_text(errors="replace").splitlines():
        if " assigned " in line:
            last = line.split(" assigned ", 1)[1]
    return {(topic, int(partition)) for topic, partition in _PARTITION.findall(last)}
