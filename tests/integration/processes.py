"""Processes a test starts and always stops: `sync-service` as an operator runs it (the
installed entry point, every byte it writes kept), and a private single-node Kafka (KRaft,
the shared cache's jars) and PostgreSQL that a test may stop, kill and start again
without touching the shared ones. (Servers configured for TLS are in `private_servers`.)
Its ports stay below the kernel's ephemeral range (32768 and up), where a client's own
connection could take them first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from sync_service.config import Settings
from tests.integration.harness import as_environment

ROOT = Path(__file__).resolve().parents[2]
EXECUTABLE = Path(sys.executable).with_name("sync-service")
KAFKA_LIBS = ROOT / ".cache" / "kafka" / "libs"


def environment(settings: Settings, **overrides: Any) -> dict[str, str]:
    """This process's environment without any SYNC_*, then `settings` as SYNC_* (raw
    values: a password stays a password), then `overrides` (`log_format="json"`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    env.update(as_environment(settings))
    env.update({f"SYNC_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


class Output:
    """Every byte a process wrote to one stream, with when each line came."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lines: list[tuple[float, str]] = []

    async def collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.data += line
            self.lines.append((time.monotonic(), line.decode(errors="replace").rstrip("\n")))

    def since(self, moment: float) -> list[str]:
        return [line for at, line in self.lines if at >= moment]

    def text(self) -> str:
        return self.data.decode(errors="replace")


class Command:
    """A finished `sync-service` command: its exit code and every byte it wrote."""

    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-2000:]!r}"


async def command(env: Mapping[str, str], *args: str, within: float = 120) -> Command:
    """Run `sync-service *args` to its end."""
    process = await asyncio.create_subprocess_exec(
        str(EXECUTABLE),
        *args,
        env=dict(env),
        cwd=Path(__file__).parent,  # not the repo root: no `.env` may leak in
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Command(process.returncode, stdout, stderr)


class Service:
    """`sync-service [--debug] run` in a subprocess; `stderr` fills as it writes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout, self.stderr = Output(), Output()
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self.stdout.collect(process.stdout)),
            asyncio.create_task(self.stderr.collect(process.stderr)),
        ]

    async def wait_for_line(self, needle: str, *, since: float = 0.0, within: float = 90) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.stderr.since(since):
                if needle in line:
                    return line
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.2)
        raise AssertionError(f"no line with {needle!r} in:\n{self.stderr.text()[-4000:]}")

    async def get(self, port: int, path: str) -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return await response.read()

    async def stop(self, grace_s: float = 60) -> int:
        """SIGTERM, then SIGKILL past `grace_s`; the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=grace_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await asyncio.gather(*self._readers)
        assert self.process.returncode is not None
        return self.process.returncode


@contextlib.asynccontextmanager
async def service(env: Mapping[str, str], *args: str) -> AsyncIterator[Service]:
    """`sync-service *args` (e.g. `run`, `--debug run`), stopped when the block ends."""
    process = await asyncio.create_subprocess_exec(
        str(EXECUTABLE),
        *args,
        env=dict(env),
        cwd=Path(__file__).parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Service(process)
    try:
        yield running
    finally:
        await running.stop()


class PrivateKafka:
    """A single-node KRaft broker of the test's own on `port` (controller on `port + 1`),
    its data in `directory`: stop it and start it again as often as needed."""

    def __init__(self, directory: Path, port: int = 24092) -> None:
        self.directory = directory
        self.port = port
        self.bootstrap = f"localhost:{port}"
        self._process: asyncio.subprocess.Process | None = None
        self._properties = directory / "server.properties"
        self._log = directory / "logs" / "server.log"

    def _java(self, *args: str) -> list[str]:
        log4j = self.directory / "log4j.properties"
        return [
            "java", "-Xms128m", "-Xmx384m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            f"-Dkafka.logs.dir={self.directory / 'logs'}",
            "-cp", f"{KAFKA_LIBS}/*", *args,
        ]  # fmt: skip

    def _configure(self) -> None:
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        controller = self.port + 1
        self._properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@localhost:{controller}",
                    "controller.listener.names=CONTROLLER",
                    f"listeners=PLAINTEXT://localhost:{self.port},CONTROLLER://localhost:{controller}",
                    f"advertised.listeners=PLAINTEXT://localhost:{self.port}",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.directory / 'data'}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=3",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=3",
                    "group.initial.rebalance.delay.ms=0",
                    "num.network.threads=2",
                    "num.io.threads=2",
                ]
            )
            + "\n"
        )
        (self.directory / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, server\n"
            "log4j.appender.server=org.apache.log4j.FileAppender\n"
            f"log4j.appender.server.File={self._log}\n"
            "log4j.appender.server.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.server.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )

    async def start(self, within: float = 180) -> None:
        """Start the broker (formatting its storage the first time) and wait until it serves."""
        if not self._properties.exists():
            self._configure()
            cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            cluster = "A" + cluster[1:]  # never a leading '-', which reads as an option
            formatting = await asyncio.create_subprocess_exec(
                *self._java(
                    "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(self._properties)
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await formatting.communicate()
            assert formatting.returncode == 0, output.decode()[-2000:]
        offset = self._log.stat().st_size if self._log.exists() else 0
        self._process = await asyncio.create_subprocess_exec(
            *self._java("kafka.Kafka", str(self._properties)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise AssertionError(f"private Kafka exited: {self._tail()}")
            if self._log.exists() and "Kafka Server started" in self._log.read_text()[offset:]:
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"private Kafka did not start within {within:.0f}s: {self._tail()}")

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGKILL with `kill`, else SIGTERM and SIGKILL after 60 s)."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()

    def _tail(self) -> str:
        return self._log.read_text()[-3000:] if self._log.exists() else "(no log)"


@contextlib.asynccontextmanager
async def private_kafka(directory: Path, port: int = 24092) -> AsyncIterator[PrivateKafka]:
    """A private broker for the block, always stopped at its end."""
    kafka = PrivateKafka(directory, port)
    try:
        await kafka.start()
        yield kafka
    finally:
        await kafka.stop(kill=True)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A PostgreSQL server of the test's own on `port` (trusting loopback, as the shared
    one does), its data in a fresh directory owned by the `postgres` OS user (the server
    refuses to run as root): stop it and start it again as often as needed."""

    def __init__(self, port: int = 26432) -> None:
        self.port = port
        self.url = f"postgresql+asyncpg://postgres@localhost:{port}/postgres"
        self.directory = Path(tempfile.mkdtemp(prefix="sync-logs-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self._data = self.directory / "data"

    async def _as_postgres(self, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, f"{' '.join(args)}: {output.decode()[-2000:]}"

    async def start(self) -> None:
        if not self._data.exists():
            await self._as_postgres(
                str(PG_BIN / "initdb"), "-D", str(self._data), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8",
            )  # fmt: skip
        options = f"-p {self.port} -c listen_addresses=localhost -c unix_socket_directories="
        await self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self._data), "-o", options,
            "-l", str(self.directory / "server.log"), "-w", "-t", "120", "start",
        )  # fmt: skip

    async def stop(self) -> None:
        """A fast shutdown: clients are disconnected at once."""
        if (self._data / "postmaster.pid").exists():
            await self._as_postgres(
                str(PG_BIN / "pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop"
            )

    async def restart_fast(self) -> None:
        """Every session ended and its open transaction rolled back, then up again."""
        await self.stop()
        await self.start()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def private_postgres(port: int = 26432) -> AsyncIterator[PrivatePostgres]:
    """A private server for the block, always stopped and removed at its end."""
    server = PrivatePostgres(port)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        server.remove()
