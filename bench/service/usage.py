"""What the machine spends over a window: CPU seconds by role (the measured processes,
PostgreSQL, Kafka, Kafka Connect, the benchmark, everything else) and peak resident memory.

Invariant: every CPU second the machine was busy is in exactly one role (`other` is what
no role claims), so a busy neighbour shows instead of hiding in a figure.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def process_cpu_seconds(process: psutil.Process) -> float:
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
                found[(role, process.pid)] = process_cpu_seconds(process)
    return found


def role_cpu_seconds(role: str) -> float:
    """CPU seconds so far of every running process of `role` (`postgresql`, `kafka`...):
    two readings bound a window without a sampling thread in the reading process."""
    return sum(seconds for (found, _), seconds in _cpu_by_role([], False).items() if found == role)


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
                self._hwm = max(self._hwm, sum(high_water_mark(pid) for pid in self.pids))
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


def high_water_mark(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
