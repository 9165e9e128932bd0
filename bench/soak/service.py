"""The service under soak: `sync-service consume` twice and `sync-service relay`, each a
child process with its own HTTP port and log, which faults may kill, stop or restart.

Invariant: only these processes are ever signalled; Kafka and PostgreSQL are shared and
are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.service.names import Run, free_port

REPLICAS = (("consume-1", "consume"), ("consume-2", "consume"), ("relay", "relay"))
"""Two consumer replicas share the partitions; one relay publishes the outbox."""


class Replica:
    """One service process: started again after a fault under the same name and port,
    appending to the same log."""

    def __init__(self, name: str, role: str, run: Run, logs: Path) -> None:
        self.name = name
        self.role = role
        self.port = free_port()
        self.log = logs / f"{name}.log"
        self._env = {**run.env(), "SYNC_HTTP_PORT": str(self.port)}
        self.process: subprocess.Popen[bytes] | None = None
        self.under_fault = False
        """A fault has stopped, killed or frozen it on purpose: no surprise if it is down."""

    def start(self) -> int:
        script = Path(sys.executable).with_name("sync-service")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(script), self.role], env=self._env, stdout=out, stderr=subprocess.STDOUT
            )
        return self.process.pid

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, number: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(number)

    async def wait(self, timeout_s: float) -> int | None:
        """The exit code once it has exited; None if it still runs after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return None

    def rss_mb(self) -> float | None:
        if self.process is None or self.process.poll() is not None:
            return None
        try:
            rss = psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return None
        return float(rss) / (1 << 20) if rss else None  # 0: killed, not yet reaped

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (after SIGCONT, should a fault have left it stopped), SIGKILL if it hangs."""
        if self.process is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode


class Service:
    """The replicas of one soak."""

    def __init__(self, run: Run, logs: Path) -> None:
        self.replicas = {name: Replica(name, role, run, logs) for name, role in REPLICAS}

    def start(self) -> None:
        for replica in self.replicas.values():
            replica.start()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every replica's /readyz answers 200 and the relay is the active publisher;
        a `RuntimeError` naming the logs otherwise."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                for replica in self.replicas.values():
                    if replica.exit_code() is not None:
                        raise RuntimeError(
                            f"{replica.name} exited with {replica.exit_code()}: see {replica.log}"
                        )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    if all([await _ready(http, r.port) for r in self.replicas.values()]) and (
                        await _relay_active(http, self.replicas["relay"].port)
                    ):
                        return
                await asyncio.sleep(0.2)
        logs = ", ".join(str(r.log) for r in self.replicas.values())
        raise RuntimeError(f"the service was not ready within {timeout_s:.0f} s: see {logs}")

    def sample(self) -> dict[str, dict[str, Any]]:
        """Each replica's pid and resident memory (MB) now."""
        return {
            name: {"pid": r.pid, "rss_mb": _round(r.rss_mb()), "under_fault": r.under_fault}
            for name, r in self.replicas.items()
        }

    def stop(self) -> dict[str, int | None]:
        """Stop every replica; their exit codes."""
        return {name: replica.stop() for name, replica in self.replicas.items()}


async def _ready(http: aiohttp.ClientSession, port: int) -> bool:
    async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
        return ready.status == 200


async def _relay_active(http: aiohttp.ClientSession, port: int) -> bool:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        body = await response.text()
    return any(
        line.startswith("sync_relay_active ") and float(line.split()[1]) > 0
        for line in body.splitlines()
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
