"""The service as the benchmark runs it: `sync-service consume` and `sync-service relay` as
child processes on the run's names, each with its log and HTTP port, stopped by SIGTERM.

Invariant: every process started here is stopped here, by its own process id.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.service.names import Run, free_port
from bench.service.usage import high_water_mark, process_cpu_seconds

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
                    spent[child.role] = process_cpu_seconds(psutil.Process(child.process.pid))
        return spent

    def peak_rss(self) -> dict[str, int]:
        """Each role's peak resident memory so far (the kernel's high-water mark)."""
        return {
            c.role: high_water_mark(c.process.pid) for c in self._children if c.process is not None
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
