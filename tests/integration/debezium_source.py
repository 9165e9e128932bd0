"""A real upstream for the Debezium input: a source database of the test's own on the shared
PostgreSQL, and Debezium's PostgreSQL connector (pgoutput) on Kafka Connect standalone.

The jars come from Maven Central (the worker: bench/peer/runtime's POM; the connector:
tests/integration/debezium/pom.xml) into `.cache/debezium-source/`; the worker is
bench/peer's `ConnectWorker` on this suite's REST port. Everything made here (database,
publication, slot, JVM) is removed again on the way out.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.peer.worker import ConnectWorker, Layout
from sync_service.config import Settings
from sync_service.ops.offsets import offset_reader, partition_bounds, partition_counts

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "debezium-source"
PLUGIN_POM = REPO / "tests" / "integration" / "debezium" / "pom.xml"
RUNTIME_POM = REPO / "bench" / "peer" / "pom.xml"
SETTINGS_XML = REPO / "bench" / "peer" / "settings.xml"
REST_PORT = 18083
CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"

SOURCE_SCHEMA = [
    # The source's own rules: a plain unique email (deferred, so that two users can swap
    # theirs in one transaction), hard deletes, and the foreign key.
    """CREATE TABLE users (
        id bigint PRIMARY KEY,
        email text NOT NULL,
        name text NOT NULL,
        active boolean NOT NULL,
        country text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        CONSTRAINT users_email_key UNIQUE (email) DEFERRABLE INITIALLY DEFERRED)""",
    """CREATE TABLE orders (
        id bigint PRIMARY KEY,
        user_id bigint NOT NULL REFERENCES users (id),
        total numeric(14, 2) NOT NULL CHECK (total >= 0),
        currency text NOT NULL,
        status text NOT NULL,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL)""",
]


class FetchError(RuntimeError):
    """Maven could not copy the jars; the message names the log."""


@dataclass(frozen=True)
class SourceLayout(Layout):
    """The worker's jars under `.cache/debezium-source/`, its state in a directory of the
    test's own."""

    state_dir: Path = Path()

    @property
    def cache(self) -> Path:
        return CACHE

    @property
    def runtime(self) -> Path:
        return CACHE / "runtime"

    @property
    def plugins(self) -> Path:
        return CACHE / "plugin"

    @property
    def state(self) -> Path:
        return self.state_dir


def fetch_jars() -> None:
    """Copy the worker's and the connector's jars with Maven, unless the POMs are unchanged
    since the last complete copy."""
    poms = [RUNTIME_POM, RUNTIME_POM.parent / "runtime" / "pom.xml", PLUGIN_POM]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in poms)).hexdigest()
    marker = CACHE / ".complete"
    if marker.exists() and marker.read_text() == digest:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    common = ["mvn", "-q", "-B", "-s", str(SETTINGS_XML), f"-Dmaven.repo.local={REPO}/.cache/m2"]
    steps = [
        [*common, "-f", str(RUNTIME_POM), "-pl", "runtime", "dependency:copy-dependencies",
         f"-Dpeer.cache={CACHE}"],
        [*common, "-f", str(PLUGIN_POM), "dependency:copy-dependencies",
         f"-Dplugin.dir={CACHE / 'plugin'}"],
    ]  # fmt: skip
    log = CACHE / "maven.log"
    with log.open("wb") as out:
        for command in steps:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise FetchError(f"fetching Connect and Debezium failed: see {log}")
    marker.write_text(digest)


@dataclass(frozen=True)
class SourceDatabase:
    """The source: its own database beside the target's, a publication of its two tables,
    and the name of the slot the connector makes."""

    url: str
    name: str
    publication: str
    slot: str

    def engine(self) -> AsyncEngine:
        return create_async_engine(self.url, poolclass=NullPool)


@asynccontextmanager
async def source_database(server_url: str, tag: str) -> AsyncIterator[SourceDatabase]:
    """A new source database with the tables and the publication; on the way out, the
    connectors' slots on it and the database (with its publication) are dropped."""
    server = make_url(server_url)
    suffix = uuid.uuid4().hex[:8]
    name = f"{tag}_src_{suffix}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    source = SourceDatabase(
        url=server.set(database=name).render_as_string(hide_password=False),
        name=name,
        publication=f"{tag}_pub_{suffix}",
        slot=f"{tag}_slot_{suffix}",
    )
    engine = source.engine()
    try:
        async with engine.begin() as connection:
            for statement in SOURCE_SCHEMA:
                await connection.execute(text(statement))
            await connection.execute(
                text(f'CREATE PUBLICATION "{source.publication}" FOR TABLE users, orders')
            )
        yield source
    finally:
        await engine.dispose()
        async with admin.connect() as connection:
            for _ in range(100):  # a slot is busy until its connector's session ends
                slots = await connection.execute(
                    text("SELECT slot_name, active FROM pg_replication_slots"
                         " WHERE database = :d"),
                    {"d": name},
                )  # fmt: skip
                found = slots.all()
                for slot, active in found:
                    if not active:
                        await connection.execute(
                            text("SELECT pg_drop_replication_slot(:s)"), {"s": slot}
                        )
                if not any(active for _, active in found):
                    break
                await asyncio.sleep(0.1)
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def connector_config(
    source: SourceDatabase, *, prefix: str, schemas: bool = True, decimals: str = "precise"
) -> dict[str, str]:
    """The connector as the README's "From Debezium" section shows it: pgoutput, the
    publication made beforehand, a slot of its own, an initial snapshot, and the JSON
    converter on the connector (with or without schemas)."""
    url = make_url(source.url)
    converter = "org.apache.kafka.connect.json.JsonConverter"
    return {
        "connector.class": CONNECTOR,
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": url.host or "localhost",
        "database.port": str(url.port or 5432),
        "database.user": url.username or "postgres",
        "database.password": url.password or "",
        "database.dbname": source.name,
        "topic.prefix": prefix,
        "table.include.list": "public.users,public.orders",
        "publication.name": source.publication,
        "publication.autocreate.mode": "disabled",
        "slot.name": source.slot,
        "snapshot.mode": "initial",
        "decimal.handling.mode": decimals,
        "key.converter": converter,
        "key.converter.schemas.enable": str(schemas).lower(),
        "value.converter": converter,
        "value.converter.schemas.enable": str(schemas).lower(),
    }


class DebeziumSource:
    """Connect standalone running one Debezium connector; `restart` kills the JVM (no
    offsets flushed on the way out) and starts it again from its offsets file."""

    def __init__(self, bootstrap: str, state: Path, name: str, config: dict[str, str]) -> None:
        self.worker = ConnectWorker(
            SourceLayout(REPO, state_dir=state),
            bootstrap=bootstrap,
            port=REST_PORT,
            heap="512m",
            # The slot only moves on as offsets are flushed: a short interval keeps the
            # number of re-sent changes after a kill small (but never nil mid-stream).
            overrides={"offset.flush.interval.ms": "2000"},
        )
        self.name = name
        self.config = config

    async def start(self, *, keep_offsets: bool = False) -> None:
        await asyncio.to_thread(self.worker.start, 180.0, keep_offsets=keep_offsets)
        await asyncio.to_thread(self.worker.create, self.name, self.config)

    async def restart(self) -> None:
        await asyncio.to_thread(self.worker.kill)
        await self.start(keep_offsets=True)

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop)

    async def failure(self) -> str | None:
        return await asyncio.to_thread(self.worker.failure, self.name)

    @property
    def log(self) -> Path:
        return self.worker.log


async def end_offsets(bootstrap: str, topics: list[str]) -> int:
    """The sum of the end offsets of every partition of `topics`."""
    settings = Settings(kafka_bootstrap=bootstrap)
    async with offset_reader(settings) as reader:
        counts = await partition_counts(settings, topics)
        partitions = [(t, p) for t, n in counts.items() for p in range(n)]
        bounds = await partition_bounds(reader, partitions)
    return sum(b.end for b in bounds.values())
