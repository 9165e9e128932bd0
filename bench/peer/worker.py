"""Kafka Connect standalone with Debezium's JDBC sink: fetched from Maven Central, run by `java`.

A worker started here is ours alone: its own REST port, offsets file and logs under
`.services/bench-peer/`, and it is stopped by its own process id.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

CONNECTOR_CLASS = "io.debezium.connector.jdbc.JdbcSinkConnector"
BUSY_PORTS = frozenset({8080, 8083})  # the service's HTTP port and Connect's default


class PeerError(RuntimeError):
    """The peer could not be fetched, started or driven; the message says where to look."""


@dataclass(frozen=True)
class Layout:
    """Where the peer's inputs and state live, relative to the repository."""

    repo: Path

    @property
    def pom(self) -> Path:
        return self.repo / "bench" / "peer" / "pom.xml"

    @property
    def cache(self) -> Path:
        return self.repo / ".cache" / "bench-peer"

    @property
    def runtime(self) -> Path:
        return self.cache / "runtime"

    @property
    def plugins(self) -> Path:
        return self.cache / "plugin"

    @property
    def state(self) -> Path:
        return self.repo / ".services" / "bench-peer"


def _poms_digest(layout: Layout) -> str:
    digest = hashlib.sha256()
    for pom in sorted(layout.pom.parent.glob("**/pom.xml")):
        digest.update(pom.read_bytes())
    return digest.hexdigest()


def fetch(layout: Layout) -> None:
    """Copy the worker's and the connector's jars under `.cache/bench-peer/` with Maven,
    unless the POMs are unchanged since the last complete copy."""
    marker = layout.cache / ".complete"
    digest = _poms_digest(layout)
    if marker.exists() and marker.read_text() == digest:
        return
    layout.state.mkdir(parents=True, exist_ok=True)
    log = layout.state / "maven.log"
    command = [
        "mvn", "-q", "-B",
        "-s", str(layout.pom.parent / "settings.xml"),
        "-f", str(layout.pom),
        "dependency:copy-dependencies",
        f"-Dpeer.cache={layout.cache}",
        f"-Dmaven.repo.local={layout.repo / '.cache' / 'm2'}",
    ]  # fmt: skip
    with log.open("wb") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise PeerError(f"fetching the peer's jars failed (exit {done.returncode}): see {log}")
    marker.write_text(digest)


def free_port() -> int:
    """A loopback port that nothing listens on now, never Connect's default 8083."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in BUSY_PORTS:
            return port


_LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File={log}
log4j.appender.file.Append=false
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c:%L)%n
log4j.logger.org.apache.kafka.clients=WARN
log4j.logger.org.hibernate=WARN
"""


def worker_properties(layout: Layout, *, bootstrap: str, port: int) -> dict[str, str]:
    """Standalone worker settings: JSON with schemas both ways (the sink needs schemas),
    offsets in a file of its own, plugins found by their service manifests (no slow scan)."""
    converter = "org.apache.kafka.connect.json.JsonConverter"
    return {
        "bootstrap.servers": bootstrap,
        "key.converter": converter,
        "key.converter.schemas.enable": "true",
        "value.converter": converter,
        "value.converter.schemas.enable": "true",
        "offset.storage.file.filename": str(layout.state / "connect.offsets"),
        "offset.flush.interval.ms": "1000",
        "plugin.path": str(layout.plugins),
        "plugin.discovery": "service_load",
        "listeners": f"http://127.0.0.1:{port}",
        # Lets each connector size its consumer's polls to its batch size.
        "connector.client.config.override.policy": "All",
    }


def sink_config(
    *,
    topics: list[str],
    jdbc_url: str,
    user: str,
    password: str,
    batch_size: int,
    tasks: int = 1,
    reduction_buffer: bool = False,
    unnest_insert: bool = False,
) -> dict[str, str]:
    """The JDBC sink in upsert mode with deletes, keyed by the record key, writing into
    tables made beforehand (no schema evolution). The RegexRouter keeps the topic's last
    dotted part as the table, so that `peer.users` (or `peer.<run>.users`) lands in `users`.

    A poll returns at most `max.poll.records` records and the sink flushes each `put()`,
    so the consumer's poll size is set to the batch size, or batches could not grow past
    500. The UNNEST insert writes a batch as one statement, which fails on two rows with
    the same key, so it is only offered together with the reduction buffer."""
    if unnest_insert and not reduction_buffer:
        raise ValueError("the UNNEST insert needs the reduction buffer (one row per key)")
    return {
        "connector.class": CONNECTOR_CLASS,
        "tasks.max": str(tasks),
        "topics": ",".join(topics),
        "connection.url": jdbc_url,
        "connection.username": user,
        "connection.password": password,
        "connection.pool.min_size": "1",
        "connection.pool.max_size": str(max(2, tasks)),
        "insert.mode": "upsert",
        "delete.enabled": "true",
        "primary.key.mode": "record_key",
        "primary.key.fields": "id",
        "schema.evolution": "none",
        "batch.size": str(batch_size),
        "use.reduction.buffer": str(reduction_buffer).lower(),
        "dialect.postgres.unnest.insert.enabled": str(unnest_insert).lower(),
        "consumer.override.max.poll.records": str(batch_size),
        "consumer.override.auto.offset.reset": "earliest",
        "transforms": "route",
        "transforms.route.type": "org.apache.kafka.connect.transforms.RegexRouter",
        "transforms.route.regex": r".*\.([^.]+)",
        "transforms.route.replacement": "$1",
    }


def _write_properties(path: Path, values: dict[str, str]) -> None:
    # Java properties: a backslash escapes, so paths and regexes need theirs doubled.
    lines = [f"{key}={value.replace(chr(92), chr(92) * 2)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


class ConnectWorker:
    """One Connect standalone JVM with no connector at start; connectors come over REST.
    Its methods block (subprocess, HTTP): from async code, call them in a thread if other
    tasks must run meanwhile."""

    def __init__(
        self,
        layout: Layout,
        *,
        bootstrap: str,
        port: int | None = None,
        heap: str = "1g",
        java: str = "java",
        overrides: dict[str, str] | None = None,
    ) -> None:
        self.layout = layout
        self.overrides = overrides or {}
        """Worker properties over `worker_properties`'s."""
        self.port = port or free_port()
        self.bootstrap = bootstrap
        self.heap = heap
        self.java = java
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.layout.state / "connect.log"

    def start(self, timeout: float = 180.0, *, keep_offsets: bool = False) -> float:
        """Start the JVM and wait until its REST API answers; return the seconds it took.
        With `keep_offsets`, source connectors resume from the offsets of the last run."""
        state = self.layout.state
        state.mkdir(parents=True, exist_ok=True)
        if not keep_offsets:
            (state / "connect.offsets").unlink(missing_ok=True)
        properties = state / "worker.properties"
        values = worker_properties(self.layout, bootstrap=self.bootstrap, port=self.port)
        _write_properties(properties, values | self.overrides)
        log4j = state / "log4j.properties"
        log4j.write_text(_LOG4J.format(log=self.log))
        command = [
            self.java,
            "-Xms256m", f"-Xmx{self.heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            "-cp", str(self.layout.runtime / "*"),
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(properties),
        ]  # fmt: skip
        started = time.monotonic()
        with (state / "connect.out").open("wb") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        (state / "connect.pid").write_text(str(self._process.pid))
        while True:
            if self._process.poll() is not None:
                raise PeerError(
                    f"Connect exited with {self._process.returncode} while starting: see {self.log}"
                )
            try:
                self.request("GET", "/connectors")
            except (OSError, PeerError) as error:
                if time.monotonic() - started > timeout:
                    self.stop()
                    raise PeerError(
                        f"Connect did not answer within {timeout:.0f}s: see {self.log}"
                    ) from error
                time.sleep(0.2)
                continue
            return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM our JVM (Connect stops its tasks cleanly on it), SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        (self.layout.state / "connect.pid").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL our JVM, as a crash would end it: nothing is flushed on the way out."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        (self.layout.state / "connect.pid").unlink(missing_ok=True)

    def peak_rss_bytes(self) -> int | None:
        """The JVM's peak resident set so far (VmHWM), or None when it is not running."""
        if self._process is None:
            return None
        for line in Path(f"/proc/{self._process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise PeerError(
                f"{method} {path}: HTTP {error.code} {error.read().decode()}"
            ) from error
        return orjson.loads(payload) if payload else None

    def create(self, name: str, config: dict[str, str]) -> None:
        self.request("POST", "/connectors", {"name": name, "config": config})

    def delete(self, name: str) -> None:
        self.request("DELETE", f"/connectors/{name}")

    def failure(self, name: str) -> str | None:
        """The trace of a failed connector or task, or None while all run (or start)."""
        status = self.request("GET", f"/connectors/{name}/status")
        for part in (status["connector"], *status["tasks"]):
            if part["state"] == "FAILED":
                return str(part.get("trace", "failed"))
        return None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
