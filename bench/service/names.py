"""The names one run owns: its topics, groups, relay ids, HTTP ports and databases, made
fresh for every phase and removed at the end.

Invariant: no two runs, and no two phases of one run, share a topic or a consumer group.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from bench.progress import say
from bench.service.database import BENCH_DATABASE, BenchDatabase, drop_database
from bench.workload import PARTITIONS, Topics
from sync_service.config import Settings
from sync_service.kafka import ensure_topics
from sync_service.relay.position import ensure_position_topic


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

    def again(self, run: Run, phase: str, inbound_format: str = "native") -> Run:
        """Settings for another drain of `run`'s inbound topics: a group, relay ids and
        downstream topics of its own (create them with `create_topics`)."""
        fresh = self.fresh(phase)
        inbound = {"users_topic": run.settings.users_topic,
                   "orders_topic": run.settings.orders_topic}  # fmt: skip
        return Run(fresh.prefix, fresh.settings.model_copy(update=inbound), inbound_format)

    async def create_topics(self, run: Run, partitions: int = PARTITIONS) -> None:
        s = run.settings
        topics = [s.users_topic, s.orders_topic, s.out_users_topic, s.out_orders_topic]
        await ensure_topics(self.base, dict.fromkeys(topics, partitions))
        await ensure_position_topic(s)
        for topic in [*topics, s.relay_position_topic]:
            if topic not in self.made_topics:
                self.made_topics.append(topic)

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
    inbound_format: str = "native"
    """How the inbound topics' records are written; the service is told any other
    (`SYNC_INBOUND_FORMAT`)."""

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
        if self.inbound_format != "native":
            own["inbound_format"] = self.inbound_format
        return {**os.environ, **{f"SYNC_{k.upper()}": v for k, v in own.items()}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
