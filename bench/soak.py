"""A soak: the service at a steady rate for a long time, with a few faults, watched for
growth. Not part of CI.

    python -m bench.soak [--minutes 30] [--rate 500]

Two static `consume` replicas and a `relay` (as `bench/fleet.py` runs them) take a seeded
history at `rate` events/s. A third of the way in, one consumer is killed -9 and started
again; two thirds in, the other is SIGSTOPped for 15 s. Every 10 s the resident memory
(RSS) of each process and the lag (records produced but not yet stored) are sampled;
each event's time from its send to its downstream event (read_committed) gives a p99 per
30 s window. At the end the target is checked against the generator's expected state.

Results: bench/results/soak-<time>.json and a plot of the three against time,
bench/results/soak-<time>.png (and soak-latest.png). The verdict on memory compares the
mean RSS of the never-restarted processes over the second fifth of the run (after
warm-up) with that over the last fifth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench.fleet import Fleet, fleet, wait_for
from bench.groups import PARTITIONS, prepare, teardown
from bench.latency import DownstreamWatcher
from bench.report import percentile
from bench.run_service import say
from sync_service.config import Settings
from sync_service.events.outbound import downstream_event_text
from sync_service.kafka import ensure_topics
from sync_service.ops.traffic import Traffic, table_checksum

RESULTS = Path(__file__).with_name("results")
SAMPLE_S = 10.0
WINDOW_S = 30.0
PAUSE_S = 15.0


class Soak:
    """One run's producer, samples and faults."""

    def __init__(self, settings: Settings, engine: AsyncEngine, rate: float, seconds: float):
        self.settings = settings
        self.engine = engine
        self.rate = rate
        self.traffic = Traffic(
            seed=61, id_base=random.randrange(10**6) * 10**6, partitions=PARTITIONS
        )
        self.events = int(rate * seconds)
        self.sent_at: dict[str, float] = {}
        self.produced = 0
        self.samples: list[dict[str, float]] = []
        self.faults: list[tuple[float, str]] = []
        self.started = time.monotonic()

    def at(self) -> float:
        return round(time.monotonic() - self.started, 1)

    async def produce(self) -> None:
        s = self.settings
        topics = {"user": s.users_topic, "order": s.orders_topic}
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=5)
        await producer.start()
        try:
            for index, event in enumerate(self.traffic.events(self.events)):
                due = self.started + index / self.rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                await producer.send(topics[event.entity], event.value, key=event.key,
                                    partition=event.partition)  # fmt: skip
                if not event.bad:
                    inbound = uuid.UUID(orjson.loads(event.value)["event_id"])
                    self.sent_at.setdefault(downstream_event_text(inbound), time.monotonic())
                self.produced += 1
            await producer.flush()
        finally:
            await producer.stop()

    async def sample(self, group: Fleet, stop: asyncio.Event) -> None:
        while not stop.is_set():
            rss = {r.name: _rss_mb(r.pid) for r in group.all if r.running}
            async with self.engine.connect() as connection:
                stored = await connection.scalar(
                    text("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
                         " WHERE group_id = :g"),
                    {"g": self.settings.group_id},
                )  # fmt: skip
            self.samples.append({"t_s": self.at(), **rss, "lag": self.produced - int(stored or 0)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)

    def windows(self, seen: dict[str, float]) -> list[dict[str, float]]:
        """p99 from send to downstream per `WINDOW_S` window of send times."""
        buckets: dict[int, list[float]] = {}
        for event_id, sent in self.sent_at.items():
            if event_id in seen:
                buckets.setdefault(int((sent - self.started) // WINDOW_S), []).append(
                    seen[event_id] - sent
                )
        return [
            {"t_s": (b + 0.5) * WINDOW_S, "p99_ms": round(percentile(sorted(v), 99) * 1000, 1),
             "count": len(v)}
            for b, v in sorted(buckets.items())
        ]  # fmt: skip


def _rss_mb(pid: int) -> float:
    try:
        rss: int = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0.0
    return round(rss / 2**20, 1)


async def soak(base: Settings, minutes: float, rate: float) -> dict[str, Any]:
    token = secrets.token_hex(4)
    settings, database = await prepare(base, token)
    settings = settings.model_copy(update={"relay_prune_every_s": 5.0})
    await ensure_topics(
        settings.kafka_bootstrap,
        {settings.out_users_topic: PARTITIONS, settings.out_orders_topic: PARTITIONS},
    )
    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    seconds = minutes * 60
    logs = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    watcher = DownstreamWatcher(
        settings.kafka_bootstrap, [settings.out_users_topic, settings.out_orders_topic], PARTITIONS
    )
    stop = asyncio.Event()
    try:
        async with fleet(settings, logs, consumers=2, relay=True, static=True) as group:
            await wait_for(lambda: _ready(group), 180, "the service ready")
            await watcher.start()
            run = Soak(settings, engine, rate, seconds)
            producing = asyncio.create_task(run.produce())
            sampling = asyncio.create_task(run.sample(group, stop))
            say(f"soak: {run.events:,} events at {rate:,.0f}/s for {minutes:g} min")
            await asyncio.sleep(seconds / 3)
            run.faults.append((run.at(), "kill -9 consume-0, started again"))
            await group.replicas[0].kill()
            await group.replace(0)
            await asyncio.sleep(seconds / 3)
            run.faults.append((run.at(), f"SIGSTOP consume-1 for {PAUSE_S:g} s"))
            group.replicas[1].signal(signal.SIGSTOP)
            await asyncio.sleep(PAUSE_S)
            group.replicas[1].signal(signal.SIGCONT)
            await producing
            await wait_for(lambda: _drained(run), 600, "the whole stream stored")
            await wait_for(lambda: _published(run, watcher), 300, "every change downstream")
            stop.set()
            await sampling
            expected = run.traffic.expected()
            exact = await table_checksum(engine, expected.id_range) == expected.checksum()
            restarted = {"consume-0"}
            steady = [r.name for r in group.all if r.name not in restarted]
    finally:
        stop.set()
        await watcher.stop()
        await engine.dispose()
        await teardown(base, settings, database)
    windows = run.windows(watcher.seen)
    latencies = sorted(watcher.seen[e] - t for e, t in run.sent_at.items() if e in watcher.seen)
    return {
        "scenario": "soak",
        "minutes": minutes,
        "rate": rate,
        "events": run.events,
        "final_state_exact": exact,
        "timed_events": len(latencies),
        "p99_ms_overall": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "max_lag": max(s["lag"] for s in run.samples),
        "rss_growth": _growth(run.samples, steady),
        "faults": run.faults,
        "samples": run.samples,
        "windows": windows,
        "logs": str(logs),
    }


def _growth(samples: list[dict[str, float]], names: list[str]) -> dict[str, dict[str, float]]:
    """Mean RSS over the second fifth of the run against the last fifth, per process."""
    n = len(samples)
    early, late = samples[n // 5 : 2 * n // 5], samples[4 * n // 5 :]
    out = {}
    for name in names:
        a = [s[name] for s in early if s.get(name)]
        b = [s[name] for s in late if s.get(name)]
        if a and b:
            before, after = statistics.mean(a), statistics.mean(b)
            out[name] = {
                "after_warmup_mb": round(before, 1),
                "at_end_mb": round(after, 1),
                "growth_pct": round(100 * (after / before - 1), 1),
            }
    return out


async def _ready(group: Fleet) -> bool:
    return all([await r.ready() for r in group.replicas])


async def _drained(run: Soak) -> bool:
    async with run.engine.connect() as connection:
        stored = await connection.scalar(
            text("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE group_id = :g"),
            {"g": run.settings.group_id},
        )
    return int(stored or 0) >= run.produced


async def _published(run: Soak, watcher: DownstreamWatcher) -> bool:
    async with run.engine.connect() as connection:
        waiting = await connection.scalar(text("SELECT count(*) FROM pending_changes"))
    return waiting == 0 and len(watcher.seen) >= run.traffic.expected().applied_at_least


def plot(result: dict[str, Any], path: Path) -> None:
    """RSS, p99 and lag against time, faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, windows = result["samples"], result["windows"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    minutes = [s["t_s"] / 60 for s in samples]
    names = sorted({k for s in samples for k in s} - {"t_s", "lag"})
    for name in names:
        axes[0].plot(minutes, [s.get(name) or None for s in samples], label=name)
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].legend(loc="upper left", fontsize="small")
    axes[1].plot([w["t_s"] / 60 for w in windows], [w["p99_ms"] for w in windows])
    axes[1].set_ylabel("p99 send -> downstream (ms)")
    axes[1].set_yscale("log")
    axes[2].plot(minutes, [s["lag"] for s in samples])
    axes[2].set_ylabel("lag (records)")
    axes[2].set_xlabel("minutes")
    for at, what in result["faults"]:
        for axis in axes:
            axis.axvline(at / 60, color="red", linestyle=":", linewidth=1)
        axes[0].annotate(what, (at / 60, axes[0].get_ylim()[1]), fontsize="x-small",
                         color="red", va="top", rotation=90)  # fmt: skip
    fig.suptitle(
        f"soak: {result['rate']:,.0f} events/s for {result['minutes']:g} min"
        f" (measured on a loaded shared machine)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    args = parser.parse_args()
    result = asyncio.run(soak(Settings(), args.minutes, args.rate))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    shutil.copyfile(path.with_suffix(".png"), RESULTS / "soak-latest.png")
    summary = {k: v for k, v in result.items() if k not in ("samples", "windows")}
    print(json.dumps(summary, indent=2))
    say(f"soak: written to {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
