"""Private servers that a fault scenario may kill or restart: a single-node KRaft Kafka
from the jars `scripts/services` caches (its server.properties, on other ports) and a
PostgreSQL 15 cluster from `initdb`, each in a temporary directory of its own.

Invariant: the shared services are never touched; what is started here is stopped (and
its directory removed) when its context ends, whatever the test did to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[3]
KAFKA_LIBS = ROOT / ".cache" / "kafka" / "libs"
KAFKA_TEMPLATE = ROOT / "scripts" / "kafka" / "server.properties"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivateKafka:
    """One broker+controller on `port` (and `port + 1` for the controller)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.bootstrap = f"localhost:{port}"
        self._dir = directory
        self._data = directory / "data"
        self._props = directory / "server.properties"
        self._log = directory / "kafka.out"
        self._process: subprocess.Popen[bytes] | None = None

    def _java(self, *args: str) -> list[str]:
        log4j = self._dir / "log4j.properties"
        return [
            "java", "-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true", f"-Dlog4j.configuration=file:{log4j}",
            f"-Dkafka.logs.dir={self._dir}", "-cp", f"{KAFKA_LIBS}/*", *args,
        ]  # fmt: skip

    def format(self) -> None:
        if not KAFKA_LIBS.is_dir():
            raise RuntimeError(f"no Kafka jars in {KAFKA_LIBS}: run scripts/services up once")
        props = KAFKA_TEMPLATE.read_text()
        props = props.replace("localhost:9093", f"localhost:{self.port + 1}")
        props = props.replace("localhost:9092", f"localhost:{self.port}")
        props = props.replace("@DATA_DIR@", str(self._data))
        self._props.write_text(props)
        (self._dir / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self._dir}/server.log\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )
        cluster = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        cluster = "A" + cluster[1:]  # never starts with '-'
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(self._props)),
            check=True,
            capture_output=True,
        )

    def _launch(self) -> subprocess.Popen[bytes]:
        with self._log.open("ab") as out:
            return subprocess.Popen(
                self._java("kafka.Kafka", str(self._props)),
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    async def start(self, within_s: float = 120.0) -> None:
        """Start (or start again, on the same data) and wait until it answers."""
        self._process = self._launch()
        deadline = time.monotonic() + within_s
        while not await self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private Kafka did not start; see {self._log}")
            await asyncio.sleep(0.5)

    async def _answers(self) -> bool:
        client = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3_000)
        try:
            await client.start()
            await client.list_topics()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    def kill(self) -> None:
        """kill -9: no flush, no controlled shutdown."""
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait()


@contextlib.asynccontextmanager
async def private_kafka(port: int) -> AsyncIterator[PrivateKafka]:
    directory = Path(tempfile.mkdtemp(prefix="faults-kafka-"))
    kafka = PrivateKafka(directory, port)
    try:
        await asyncio.to_thread(kafka.format)
        await kafka.start()
        yield kafka
    finally:
        kafka.kill()
        shutil.rmtree(directory, ignore_errors=True)


class PrivatePostgres:
    """A cluster of its own on `port`, run as the `postgres` OS user when this is root."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
        self._dir = directory
        self._data = directory / "data"
        self._log = directory / "postgres.log"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self._dir, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self._data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")  # fmt: skip

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self._dir} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c max_connections=60 -c shared_buffers=64MB"
        )
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self._data), "-l", str(self._log),
                  "-o", options, "-w", "-t", "60", *args)  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart_fast(self) -> None:
        """Fast shutdown (every session ended, open transactions rolled back), then up."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")


@contextlib.asynccontextmanager
async def private_postgres(port: int) -> AsyncIterator[PrivatePostgres]:
    directory = Path(tempfile.mkdtemp(prefix="faults-pg-"))
    server = PrivatePostgres(directory, port)
    try:
        await asyncio.to_thread(server.init)
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(directory, ignore_errors=True)
