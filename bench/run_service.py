"""sync_service as the benchmark runs it: `sync-service consume` and `sync-service relay` as
subprocesses on topics, a group and relay ids of their own, watched from outside until their
work is done, then checked.

Invariant: "done" is what PostgreSQL and Kafka show (stored positions at the end offsets,
nothing waiting, no outbox row after the relay's committed position), never the service's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.report import Phase
from bench.workload import PARTITIONS, Topics, Workload, produce_backlog
from sync_service.config import Settings
from sync_service.errors import UserError
from sync_service.kafka import ensure_topics
from sync_service.ops.migrate import upgrade
from sync_service.ops.offsets import offset_reader, partition_bounds, partition_counts
from sync_service.ops.traffic import ExpectedState, table_checksum
from sync_service.relay.position import START, Position, decode_position, ensure_position_topic

BENCH_DATABASE = "sync_bench"
_TABLES = "users, orders, outbox, pending_changes, dead_letters, consumer_offsets"
POLL_S = 0.1
STALL_S = 120.0
"""No stored position and no relay position moved for this long: the run has failed."""
PROGRESS_EVERY_S = 5.0


def say(message: str) -> None:
    """A progress line for the person watching (the results go to stdout and the file)."""
    print(message, file=sys.stderr, flush=True)


# --- the target database --------------------------------------------------------------------


async def create_database(server_url: str, name: str) -> str:
    """Create database `name` on `server_url`'s server if it is missing; return its URL."""
    await _admin(server_url, name, "CREATE DATABASE {}", unless_exists=True)
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name` and end any connection to it."""
    await _admin(server_url, name, "DROP DATABASE IF EXISTS {} WITH (FORCE)")


async def _admin(server_url: str, name: str, statement: str, unless_exists: bool = False) -> None:
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            if unless_exists and await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ):
                return
            quoted = admin.dialect.identifier_preparer.quote(name)
            await connection.execute(text(statement.format(quoted)))
    except OSError as error:
        raise UserError(
            f"cannot reach PostgreSQL at {make_url(server_url).render_as_string()}: {error}"
        ) from None
    finally:
        await admin.dispose()


@dataclass(frozen=True)
class BenchDatabase:
    """A database of one run's own on the service's server, migrated to head, so that the
    run may empty its tables without touching anyone's data, another run's included."""

    name: str
    url: str
    engine: AsyncEngine

    @classmethod
    async def prepare(cls, server_url: str, name: str) -> BenchDatabase:
        url = await create_database(server_url, name)
        await upgrade(Settings(database_url=url))
        return cls(name, url, create_async_engine(url, pool_size=2))

    async def reset(self) -> None:
        """Empty every table, then checkpoint, so that no phase pays for the last one's
        dirty pages."""
        async with self.engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE"))
        async with self.engine.connect() as connection:
            await connection.execute(text("CHECKPOINT"))

    async def server(self) -> tuple[str, dict[str, str]]:
        """The server's version and the settings that bear on write throughput."""
        names = (
            "shared_buffers",
            "synchronous_commit",
            "fsync",
            "wal_level",
            "max_wal_size",
            "checkpoint_timeout",
            "work_mem",
            "max_connections",
        )
        async with self.engine.connect() as connection:
            version = str(await connection.scalar(text("SHOW server_version")))
            rows = await connection.execute(
                text(
                    "SELECT name, setting || coalesce(unit, '') FROM pg_settings"
                    " WHERE name = ANY(:names)"
                ),
                {"names": list(names)},
            )
            return version, {str(name): str(value) for name, value in rows}


# --- the names one run owns --------------------------------------------------------------


@dataclass
class Bench:
    """What every phase shares: the broker, the database, the base settings, where logs
    go, and what the run made (topics, databases), removed at the end."""

    bootstrap: str
    database: BenchDatabase
    base: Settings
    logs: Path
    made_topics: list[str] = field(default_factory=list)
    made_databases: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, base: Settings, logs: Path, token: str) -> Bench:
        name = f"{BENCH_DATABASE}_{token}"
        try:
            database = await BenchDatabase.prepare(base.database_url, name)
        except BaseException:
            await drop_database(base.database_url, name)
            raise
        return cls(base.kafka_bootstrap, database, base, logs, made_databases=[name])

    def database_beside(self, suffix: str) -> str:
        """The name of another database of this run's own; dropped at the end."""
        name = f"{self.database.name}_{suffix}"
        if name not in self.made_databases:
            self.made_databases.append(name)
        return name

    @staticmethod
    def prefix(phase: str) -> str:
        """A name no other run uses, for a phase's topics and groups."""
        return f"bench.{secrets.token_hex(4)}.{phase}"

    def fresh(self, phase: str) -> Run:
        """Settings for one run: topics, group and relay ids that no other run uses."""
        prefix = self.prefix(phase)
        settings = self.base.model_copy(
            update={
                "kafka_bootstrap": self.bootstrap,
                "database_url": self.database.url,
                "group_id": f"{prefix}.group",
                "users_topic": f"{prefix}.cdc.users",
                "orders_topic": f"{prefix}.cdc.orders",
                "out_users_topic": f"{prefix}.sync.users",
                "out_orders_topic": f"{prefix}.sync.orders",
                "relay_transactional_id": f"{prefix}.relay",
                "relay_position_topic": f"{prefix}.relay-position",
                "http_port": free_port(),
            }
        )
        return Run(prefix, settings)

    async def create_topics(self, run: Run, partitions: int = PARTITIONS) -> None:
        s = run.settings
        topics = [s.users_topic, s.orders_topic, s.out_users_topic, s.out_orders_topic]
        await ensure_topics(self.base, dict.fromkeys(topics, partitions))
        await ensure_position_topic(s)
        self.made_topics += [*topics, s.relay_position_topic]

    async def clean_up(self) -> None:
        """Best effort: delete the run's topics (the broker keeps their gigabytes until
        then) and drop its databases."""
        await self.database.engine.dispose()
        try:
            await self._delete_topics()
            for name in self.made_databases:
                await drop_database(self.base.database_url, name)
        except Exception as error:  # the results stand; only disk space is at stake
            say(f"bench: could not remove all this run made: {error}")

    async def _delete_topics(self) -> None:
        if not self.made_topics:
            return
        client = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            await client.start()
            existing = set(await client.list_topics())
            doomed = [t for t in self.made_topics if t in existing]
            if doomed:
                await client.delete_topics(doomed)
        finally:
            await client.close()


@dataclass(frozen=True)
class Run:
    prefix: str
    settings: Settings

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.users_topic, self.settings.orders_topic)

    @property
    def out_topics(self) -> list[str]:
        return [self.settings.out_users_topic, self.settings.out_orders_topic]

    def env(self) -> dict[str, str]:
        """The environment of `sync-service run`: the caller's, with this run's names."""
        s = self.settings
        own = {
            "kafka_bootstrap": s.kafka_bootstrap,
            "database_url": s.database_url,
            "group_id": s.group_id,
            "users_topic": s.users_topic,
            "orders_topic": s.orders_topic,
            "out_users_topic": s.out_users_topic,
            "out_orders_topic": s.out_orders_topic,
            "relay_transactional_id": s.relay_transactional_id,
            "relay_position_topic": s.relay_position_topic,
            "http_port": str(s.http_port),
        }
        return {**os.environ, **{f"SYNC_{k.upper()}": v for k, v in own.items()}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the service process -------------------------------------------------------------------


ROLES = ("consume", "relay")
"""How the benchmark runs the service: as deployed (deploy/), one process per role, so the
consumer and the relay each have a core's worth of Python."""


@dataclass
class _Child:
    role: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None


class ServiceProcess:
    """The service as child processes, one per role in `ROLES` (`sync-service consume`,
    `sync-service relay`), each with its log (`<log>.<role>.log`) and its own HTTP port;
    optionally under pyinstrument, whose reports are written when they stop."""

    def __init__(self, run: Run, log: Path, profile: Path | None = None) -> None:
        self.run = run
        self.log = log
        self.profile = profile
        self._children = [
            _Child(role, run.settings.http_port if i == 0 else free_port(),
                   log.with_name(f"{log.stem}.{role}.log"))
            for i, role in enumerate(ROLES)
        ]  # fmt: skip

    def start(self) -> list[int]:
        """Start every role; their pids."""
        script = Path(sys.executable).with_name("sync-service")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for child in self._children:
            command = [str(script), child.role]
            if self.profile is not None:
                report = self.profile.with_name(f"{self.profile.stem}.{child.role}.txt")
                command = [sys.executable, "-m", "pyinstrument", "--renderer", "text",
                           "--outfile", str(report), *command]  # fmt: skip
            env = {**self.run.env(), "SYNC_HTTP_PORT": str(child.port)}
            with child.log.open("wb") as out:
                child.process = subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT
                )
        return [c.process.pid for c in self._children if c.process is not None]

    def exit_code(self) -> int | None:
        """The exit code of the first role that has exited, if one has."""
        for child in self._children:
            code = None if child.process is None else child.process.poll()
            if code is not None:
                return code
        return None

    @property
    def logs(self) -> str:
        """Where the roles log, for a message."""
        return ", ".join(str(c.log) for c in self._children)

    def exited(self) -> str:
        """Which roles exited, with what, and where their logs are."""
        return ", ".join(
            f"{c.role} exited with {c.process.poll()}: see {c.log}"
            for c in self._children
            if c.process is not None and c.process.poll() is not None
        )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every role's /readyz answers 200 (schema at head, partitions assigned) and
        the relay holds its lease; a `RuntimeError` naming the log otherwise."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.exit_code() is not None:
                    raise RuntimeError(self.exited())
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    if all([await self._ready(http, c.port) for c in self._children]) and (
                        await self.metrics(http)
                    ).get("sync_relay_active", 0.0):
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the service was not ready within {timeout_s:.0f}s: see {self.logs}")

    @staticmethod
    async def _ready(http: aiohttp.ClientSession, port: int) -> bool:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
            return ready.status == 200

    async def metrics(self, http: aiohttp.ClientSession | None = None) -> dict[str, float]:
        """The service's Prometheus samples, summed over labels and roles (`name` -> value)."""
        totals: dict[str, float] = {}
        async with contextlib.AsyncExitStack() as stack:
            if http is None:
                http = await stack.enter_async_context(aiohttp.ClientSession())
            for child in self._children:
                async with http.get(f"http://127.0.0.1:{child.port}/metrics") as response:
                    body = await response.text()
                for family in text_string_to_metric_families(body):
                    for sample in family.samples:
                        totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
        return totals

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each role has spent since it started."""
        spent = {}
        for child in self._children:
            if child.process is not None:
                with contextlib.suppress(psutil.Error):
                    spent[child.role] = _cpu_seconds(psutil.Process(child.process.pid))
        return spent

    def peak_rss(self) -> dict[str, int]:
        """Each role's peak resident memory so far (the kernel's high-water mark)."""
        return {
            c.role: _high_water_mark(c.process.pid) for c in self._children if c.process is not None
        }

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM every role (the consumer finishes its batch and leaves the group), SIGKILL
        one that hangs; the first non-zero exit code, else 0."""
        running = [c.process for c in self._children if c.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in running:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            codes.append(process.returncode)
        return next((code for code in codes if code != 0), 0)


# --- what the machine spends ---------------------------------------------------------------


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _role(process: psutil.Process) -> str | None:
    """Which part of the system a process is, for the CPU breakdown."""
    try:
        if process.pid == os.getpid():
            return "bench"
        if process.username() == "postgres" or process.name().startswith("postgres"):
            return "postgresql"
        command = " ".join(process.cmdline())
    except psutil.Error:
        return None
    if "kafka.Kafka " in command:
        return "kafka"
    if "ConnectStandalone" in command:
        return "kafka_connect"
    return None


def _cpu_by_role(targets: list[int], children: bool) -> dict[tuple[str, int], float]:
    """CPU seconds so far per (role, pid); the measured processes (with their children, if
    asked) are `measured`, even when one is this very process."""
    found: dict[tuple[str, int], float] = {}
    family = set(targets)
    if children:
        for target in targets:
            with contextlib.suppress(psutil.Error):
                family.update(c.pid for c in _children(psutil.Process(target)))
    for process in psutil.process_iter():
        role = "measured" if process.pid in family else _role(process)
        if role is not None:
            with contextlib.suppress(psutil.Error):
                found[(role, process.pid)] = _cpu_seconds(process)
    return found


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return list(process.children(recursive=True))
    except psutil.Error:
        return []


class Usage:
    """Over a window: CPU seconds of the measured processes (and their children), of
    PostgreSQL, Kafka, Kafka Connect and the whole machine, and the measured processes'
    peak RSS together (sampled, and the sum of the kernel's high-water marks, which may
    exceed the sampled peak when the processes peak at different times).

    Processes are re-read every second, so that one which ends within the window (a
    database backend of a closed connection) still counts, less its last second."""

    def __init__(
        self, pids: int | list[int], *, children: bool = True, sample_s: float = 0.1
    ) -> None:
        self.pids = [pids] if isinstance(pids, int) else list(pids)
        self._children = children
        self._sample_s = sample_s
        self._peak = 0
        self._hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu_before: dict[tuple[str, int], float] = {}
        self._cpu_last: dict[tuple[str, int], float] = {}
        self._machine_before: Any = None
        self._started = 0.0

    def start(self) -> None:
        self._cpu_before = _cpu_by_role(self.pids, self._children)
        self._cpu_last = dict(self._cpu_before)
        self._machine_before = psutil.cpu_times()
        self._started = time.monotonic()
        self._thread.start()

    def _sample(self) -> None:
        processes = [psutil.Process(pid) for pid in self.pids]
        every = max(1, round(1.0 / self._sample_s))
        ticks = 0
        while not self._stop.wait(self._sample_s):
            ticks += 1
            try:
                rss = 0
                for process in processes:
                    rss += process.memory_info().rss
                    if self._children:
                        rss += sum(c.memory_info().rss for c in _children(process))
                self._hwm = max(self._hwm, sum(_high_water_mark(pid) for pid in self.pids))
            except psutil.Error:
                return
            self._peak = max(self._peak, rss)
            if ticks % every == 0:
                self._cpu_last.update(_cpu_by_role(self.pids, self._children))

    def stop(self) -> dict[str, Any]:
        """The figures; call it while the measured process still runs."""
        wall = time.monotonic() - self._started
        machine = psutil.cpu_times()
        self._stop.set()
        self._thread.join()
        self._cpu_last.update(_cpu_by_role(self.pids, self._children))
        spent: dict[str, float] = {}
        for (role, pid), seconds in self._cpu_last.items():
            spent[role] = spent.get(role, 0.0) + seconds - self._cpu_before.get((role, pid), 0.0)
        idle = (machine.idle + machine.iowait) - (
            self._machine_before.idle + self._machine_before.iowait
        )
        busy = sum(machine) - sum(self._machine_before) - idle
        cpu = {role: round(seconds, 2) for role, seconds in sorted(spent.items())}
        cpu["machine_busy"] = round(busy, 2)
        # Whatever else ran on the machine meanwhile: a busy neighbour shows here.
        cpu["other"] = round(max(0.0, busy - sum(spent.values())), 2)
        return {
            "wall_seconds": round(wall, 2),
            "cpu_seconds": cpu,
            "cores_busy": round(busy / wall, 2) if wall > 0 else None,
            "other_cores_busy": round(cpu["other"] / wall, 2) if wall > 0 else None,
            "peak_rss_bytes": self._peak,
            "rss_high_water_mark_bytes": self._hwm or None,
        }


def _high_water_mark(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- what Kafka and PostgreSQL show --------------------------------------------------------


class RelayTail:
    """Follows the relay's committed position (read_committed, from the topic's start)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key = settings.relay_transactional_id.encode()
        self.position: Position = START
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=50,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tp = TopicPartition(self._settings.relay_position_topic, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            fetched = await self._consumer.getmany(timeout_ms=200)
            for records in fetched.values():
                for record in records:
                    if record.key == self._key and record.value is not None:
                        self.position = decode_position(record.value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """The read_committed end offset of every partition of `topics`."""
    settings = Settings(kafka_bootstrap=bootstrap)
    counts = await partition_counts(settings, topics)
    async with offset_reader(settings) as reader:
        bounds = await partition_bounds(reader, [(t, p) for t in topics for p in range(counts[t])])
    return {tp: b.end for tp, b in bounds.items()}


@dataclass(frozen=True)
class Downstream:
    messages: int
    distinct: int
    """Distinct `event_id` headers: fewer than `messages` means something was doubled."""


async def count_downstream(bootstrap: str, topics: list[str]) -> Downstream:
    """Read every committed message of `topics` (read_committed) and count them."""
    ends = await end_offsets(bootstrap, topics)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )
    messages = 0
    ids: set[bytes] = set()
    await consumer.start()
    try:
        left = {TopicPartition(t, p): end for (t, p), end in ends.items() if end > 0}
        if left:
            consumer.assign(list(left))
            await consumer.seek_to_beginning(*left)
        while left:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for records in fetched.values():
                messages += len(records)
                ids.update(dict(r.headers).get("event_id", b"") for r in records)
            for tp in list(left):
                if await consumer.position(tp) >= left[tp]:
                    del left[tp]
                    consumer.pause(tp)
    finally:
        await consumer.stop()
    return Downstream(messages, len(ids))


@dataclass(frozen=True)
class Progress:
    consumed: int
    """Records whose batch committed: the sum of the stored positions."""
    waiting: bool
    dead_letters: int


async def progress(engine: AsyncEngine, group_id: str) -> Progress:
    query = text(
        "SELECT (SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g),"
        " EXISTS (SELECT 1 FROM pending_changes), (SELECT count(*) FROM dead_letters)"
    )
    async with engine.connect() as connection:
        consumed, waiting, dead = (await connection.execute(query, {"g": group_id})).one()
    return Progress(int(consumed), bool(waiting), int(dead))


async def published_all(engine: AsyncEngine, position: Position) -> bool:
    """No outbox row sorts after the relay's committed position."""
    query = text("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE (txid, id) > (:t, :i))")
    async with engine.connect() as connection:
        return bool(await connection.scalar(query, {"t": position.txid, "i": position.id}))


@dataclass
class Timeline:
    """`time.monotonic()` marks of a watched run, and the records stored at the first."""

    first_commit: float | None = None
    consumed_at_first: int = 0
    consumed_all: float | None = None
    done: float | None = None
    problem: str | None = None


async def watch(
    service: ServiceProcess,
    engine: AsyncEngine,
    tail: RelayTail,
    total: int,
    label: str,
) -> Timeline:
    """Poll until every one of `total` records is stored, nothing waits and the relay has
    published every outbox row; or the service exits, or nothing moves for `STALL_S`."""
    timeline = Timeline()
    group = service.run.settings.group_id
    last_move = last_print = time.monotonic()
    last_seen: tuple[int, Position] = (-1, START)
    while True:
        now = time.monotonic()
        if service.exit_code() is not None:
            timeline.problem = service.exited()
            return timeline
        seen = await progress(engine, group)
        if timeline.first_commit is None and seen.consumed > 0:
            timeline.first_commit, timeline.consumed_at_first = now, seen.consumed
        if seen.consumed >= total and not seen.waiting:
            timeline.consumed_all = timeline.consumed_all or now
            if await published_all(engine, tail.position):
                timeline.done = now
                return timeline
        if (seen.consumed, tail.position) != last_seen:
            last_seen, last_move = (seen.consumed, tail.position), now
        elif now - last_move > STALL_S:
            timeline.problem = (
                f"stalled: {seen.consumed:,} of {total:,} records stored, "
                f"waiting changes: {seen.waiting}; see {service.logs}"
            )
            return timeline
        if now - last_print >= PROGRESS_EVERY_S:
            last_print = now
            say(f"{label}: {seen.consumed:,} / {total:,} records stored")
        await asyncio.sleep(POLL_S)


async def check_target(
    engine: AsyncEngine,
    expected: ExpectedState,
    downstream: Downstream,
    applied: float | None,
) -> list[str]:
    """How the target and the downstream topics differ from what the history demands."""
    final = await progress(engine, group_id="")  # only its dead letters and waiting count
    checksum = await table_checksum(engine)
    problems = []
    if checksum != expected.checksum():
        problems.append("the tables' checksum differs from the expected final state")
    if final.dead_letters != expected.dead_letters:
        problems.append(f"{final.dead_letters} dead letters, expected {expected.dead_letters}")
    if final.waiting:
        problems.append("changes still wait")
    low, high = expected.applied_at_least, expected.applied_at_most
    if not low <= downstream.messages <= high:
        problems.append(f"{downstream.messages:,} downstream events, expected {low:,}..{high:,}")
    if downstream.distinct != downstream.messages:
        problems.append(f"{downstream.messages - downstream.distinct:,} downstream events doubled")
    if applied is not None and int(applied) != downstream.messages:
        problems.append(f"{int(applied):,} changes applied but {downstream.messages:,} published")
    return problems


# --- the phase ------------------------------------------------------------------------------


async def load_backlog(bench: Bench, workload: Workload) -> tuple[Run, float]:
    """Fresh topics holding the whole workload, read by sync_service and the baselines;
    returns the run that owns them and the seconds producing took."""
    run = bench.fresh("backlog")
    await bench.create_topics(run, workload.partitions)
    say(f"backlog: producing {len(workload.events):,} events to {run.prefix}.cdc.*")
    seconds = await produce_backlog(bench.bootstrap, run.topics, workload.events)
    held = sum((await end_offsets(bench.bootstrap, [run.topics.users, run.topics.orders])).values())
    if held != len(workload.events):
        raise RuntimeError(f"the topics hold {held:,} records, not {len(workload.events):,}")
    return run, seconds


async def run_sync_service(
    bench: Bench, workload: Workload, run: Run, *, profile: Path | None = None
) -> Phase:
    """Start the service on the pre-loaded backlog of `run`, time it from its first commit
    until all is stored and published, and check the result."""
    phase = Phase("sync_service")
    await bench.database.reset()
    total = len(workload.events)
    service = ServiceProcess(run, bench.logs / "sync_service.log", profile)
    tail = RelayTail(run.settings)
    await tail.start()
    spawned = time.monotonic()
    usage = Usage(service.start())
    usage.start()
    try:
        with contextlib.suppress(RuntimeError):  # `watch` reports a service that never came up
            await service.wait_ready()
        ready = time.monotonic()
        cpu_at_ready = service.cpu_seconds()
        timeline = await watch(service, bench.database.engine, tail, total, "sync_service")
        metrics = await service.metrics() if timeline.problem is None else {}
        spent = usage.stop()
        by_role = {
            role: round(seconds - cpu_at_ready.get(role, 0.0), 2)
            for role, seconds in service.cpu_seconds().items()
        }
        rss_by_role = service.peak_rss()
    finally:
        exit_code = service.stop()
        await tail.stop()
    if timeline.problem is not None or timeline.done is None or timeline.first_commit is None:
        phase.status, phase.problems = "failed", [timeline.problem or "did not finish"]
        return phase
    downstream = await count_downstream(bench.bootstrap, run.out_topics)
    phase.problems = await check_target(
        bench.database.engine,
        workload.expected,
        downstream,
        metrics.get("sync_changes_applied_total"),
    )
    if exit_code != 0:
        phase.problems.append(f"the service exited with {exit_code} on SIGTERM: see {service.logs}")
    phase.status = "wrong" if phase.problems else "ok"
    # The window opens once the service is up (schema checked, partitions assigned, relay
    # leading): the drain itself, without the process start and the group join.
    phase.events = total
    phase.seconds = timeline.done - ready
    if not phase.problems:
        phase.notes.append("checksum, dead letters, outbox count, no doubles: as expected")
    phase.figures = {
        "events_total": total,
        "startup_seconds": round(ready - spawned, 2),
        "first_commit_after_start_seconds": round(timeline.first_commit - spawned, 2),
        "stored_at_first_commit": timeline.consumed_at_first,
        "consumed_all_after_start_seconds": round(
            (timeline.consumed_all or timeline.done) - spawned, 2
        ),
        "done_after_start_seconds": round(timeline.done - spawned, 2),
        "events_per_s_including_startup": round(total / (timeline.done - spawned), 1),
        "downstream_events": downstream.messages,
        "peak_rss_bytes": max(spent["peak_rss_bytes"], spent["rss_high_water_mark_bytes"] or 0),
        "usage": spent,
        "cpu_seconds_by_role": by_role,
        "peak_rss_bytes_by_role": rss_by_role,
        "service_metrics": selected_metrics(metrics),
        "service_settings": service_settings(run.settings),
        "profiled": profile is not None,
        "logs": service.logs,
    }
    return phase


def service_settings(settings: Settings) -> dict[str, Any]:
    """The settings that shape the service's speed, as it ran."""
    names = {"batch_max_events", "batch_max_wait_ms", "poll_max_records", "pending_retry_ms",
             "pool_size", "relay_chunk", "relay_poll_ms", "relay_prune_every_s"}  # fmt: skip
    return settings.model_dump(include=names)


def selected_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The service's own counters that explain where its time went."""
    names = (
        "sync_events_consumed_total",
        "sync_changes_applied_total",
        "sync_changes_stale_total",
        "sync_changes_waited_total",
        "sync_dead_letters_total",
        "sync_outbox_published_total",
        "sync_batch_records_sum",
        "sync_batch_records_count",
        "sync_batch_write_seconds_sum",
        "sync_batch_write_seconds_count",
        "sync_relay_publish_seconds_sum",
        "sync_relay_publish_seconds_count",
        "sync_transient_failures_total",
    )
    return {name: round(metrics[name], 3) for name in names if name in metrics}
