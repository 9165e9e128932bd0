"""One soak: a database, topics and group of its own; the service as three processes; a
steady load for `minutes` with faults injected; samples every few seconds; the drain;
the checks; the results file and its picture. Everything it made is removed at the end.

Invariant: the verdicts come from what PostgreSQL, Kafka and the kernel show (stored
positions, end offsets, table checksums, downstream records, RSS), never the service's word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import report
from bench.latency import DownstreamWatcher
from bench.progress import say
from bench.service.check import check_target, count_downstream
from bench.service.database import create_database, drop_database
from bench.service.names import Run
from bench.service.watch import RelayTail, progress, published_all
from bench.soak import summary
from bench.soak.faults import SCHEDULE, Fault, inject
from bench.soak.load import (
    FORGET_S,
    CommitClock,
    DownstreamClock,
    Sending,
    produce_steadily,
    stored_positions,
)
from bench.soak.service import Service
from bench.workload import BAD_RATE, PARTITIONS
from sync_service.config import Settings
from sync_service.kafka import ensure_topics
from sync_service.ops.migrate import upgrade
from sync_service.ops.traffic import ExpectedState, Traffic
from sync_service.relay.position import ensure_position_topic

COMMIT_POLL_S = 0.1
"""How often stored positions are read: a commit's time is at most this late."""
DOWNSTREAM_DRAIN_S = 0.2
READY_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 600.0
"""After the last send, the service has this long to store and publish everything."""


@dataclass(frozen=True)
class Options:
    rate: float
    minutes: float
    warmup_minutes: float
    burst_seconds: float
    """Events of this many seconds at `rate` are sent at once when the sending starts."""

    @property
    def burst(self) -> int:
        return round(self.rate * self.burst_seconds)

    sample_seconds: float
    faults: bool
    seed: int
    results: Path


@dataclass
class _State:
    """What the sampling loops share."""

    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sending: Sending | None = None
    origin: float = 0.0
    """When the sending started (monotonic): the soak's time zero."""


async def soak(options: Options, command: str) -> dict[str, Any]:
    """Run one soak; its results (also written to `options.results`)."""
    started = datetime.now(UTC)
    commit = report.git_version()  # now: the code may be edited while a long soak runs
    token = secrets.token_hex(3)
    base = Settings()
    stamp = started.strftime("%Y%m%dT%H%M%S")
    logs = Path(".services") / "soak" / f"{stamp}-{token}"
    database = f"soak_{token}"
    prefix = f"soak.{token}"
    url = await create_database(base.database_url, database)
    run = Run(
        prefix,
        base.model_copy(
            update={
                "database_url": url,
                "group_id": f"{prefix}.group",
                "users_topic": f"{prefix}.cdc.users",
                "orders_topic": f"{prefix}.cdc.orders",
                "out_users_topic": f"{prefix}.sync.users",
                "out_orders_topic": f"{prefix}.sync.orders",
                "relay_transactional_id": f"{prefix}.relay",
                "relay_position_topic": f"{prefix}.relay-position",
            }
        ),
    )
    topics = [run.topics.users, run.topics.orders, *run.out_topics]
    try:
        await upgrade(run.settings)
        await ensure_topics(base, dict.fromkeys(topics, PARTITIONS))
        await ensure_position_topic(run.settings)
        record = await _soak(options, run, logs)
    finally:
        await _remove(base, database, [*topics, run.settings.relay_position_topic])
    record = {
        "kind": "soak",
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": report.machine(),
        "git_commit": commit,
        **record,
        "logs": str(logs),
    }
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"soak-{stamp}.json"
    path.write_text(_json(record))
    record["results_file"] = str(path)
    return record


async def _soak(options: Options, run: Run, logs: Path) -> dict[str, Any]:
    settings = run.settings
    engine = create_async_engine(settings.database_url, pool_size=3)
    burst = options.burst
    total = burst + round(options.rate * options.minutes * 60.0)
    traffic = Traffic(options.seed, bad_rate=BAD_RATE, partitions=PARTITIONS)
    commit_window, downstream_window = summary.Window(), summary.Window()
    commits, downstream = CommitClock(commit_window), DownstreamClock(downstream_window)
    service = Service(run, logs)
    tail = RelayTail(settings)
    watcher = DownstreamWatcher(settings.kafka_bootstrap, run.out_topics, PARTITIONS)
    state = _State()
    say(f"soak: starting the service ({', '.join(service.replicas)}); logs in {logs}")
    service.start()
    tasks: list[asyncio.Task[None]] = []
    exit_codes: dict[str, int | None] = {}
    try:
        await service.wait_ready(READY_TIMEOUT_S)
        await tail.start()
        await watcher.start()
        origin = state.origin = time.monotonic()
        say(
            f"soak: sending {burst:,} events at once, then {total - burst:,} at "
            f"{options.rate:,.0f}/s for {options.minutes:g} min"
        )
        tasks = [
            asyncio.create_task(_follow_commits(engine, settings.group_id, commits, state)),
            asyncio.create_task(_follow_downstream(watcher, downstream)),
            asyncio.create_task(
                _sample(
                    options,
                    run,
                    engine,
                    service,
                    origin,
                    state,
                    commit_window,
                    downstream_window,
                    commits,
                )
            ),
        ]
        if options.faults:
            tasks.append(
                asyncio.create_task(inject(service, origin, options.minutes * 60.0, state.faults))
            )
        state.sending = await produce_steadily(
            settings.kafka_bootstrap,
            run.topics,
            traffic.events(total),
            total,
            options.rate,
            commits,
            downstream,
            burst,
        )
        say(f"soak: sent {state.sending.sent:,} in {state.sending.seconds:.0f} s; draining")
        drained_s = await _drain(engine, run, tail, total, origin, state)
        await asyncio.sleep(2 * options.sample_seconds)  # the last samples and sightings
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        exit_codes = service.stop()
        await watcher.stop()
        await tail.stop()
    expected = traffic.expected()
    say("soak: checking the tables and the downstream topics")
    published = await count_downstream(settings.kafka_bootstrap, run.out_topics)
    # The service's own applied counter restarts with each process: not comparable here.
    problems = [*state.problems, *await check_target(engine, expected, published, None)]
    await engine.dispose()
    for name, code in exit_codes.items():
        if code != 0:
            problems.append(f"{name} exited with {code} on SIGTERM: see {logs / name}.log")
    return _results(
        options, state, expected_summary(expected), published.messages, drained_s, problems,
        commit_window, downstream_window, downstream.forgotten,
    )  # fmt: skip


def expected_summary(expected: ExpectedState) -> dict[str, int]:
    return {
        "events": expected.events,
        "changes": expected.changes,
        "duplicates": expected.duplicates,
        "late": expected.late,
        "dead_letters": expected.dead_letters,
        "users": len(expected.users),
        "orders": len(expected.orders),
    }


async def _follow_commits(
    engine: AsyncEngine, group_id: str, commits: CommitClock, state: _State
) -> None:
    while True:
        with contextlib.suppress(Exception):  # a failed read is only a late one
            state.positions = await stored_positions(engine, group_id)
            commits.committed(state.positions, time.monotonic())
        await asyncio.sleep(COMMIT_POLL_S)


async def _follow_downstream(watcher: DownstreamWatcher, downstream: DownstreamClock) -> None:
    while True:
        await asyncio.sleep(DOWNSTREAM_DRAIN_S)
        seen, watcher.seen = watcher.seen, {}
        downstream.seen(seen)
        downstream.forget(time.monotonic() - FORGET_S)


async def _sample(
    options: Options,
    run: Run,
    engine: AsyncEngine,
    service: Service,
    origin: float,
    state: _State,
    commit_window: summary.Window,
    downstream_window: summary.Window,
    commits: CommitClock,
) -> None:
    """Every `sample_seconds`: each process's RSS, the window's latencies, the lag; a
    process that exited on its own is noted as a problem and started again."""
    partitions = [
        TopicPartition(t, p)
        for t in (run.topics.users, run.topics.orders)
        for p in range(PARTITIONS)
    ]
    # One consumer for the whole soak: a fresh client per sample took seconds to start here.
    ends = AIOKafkaConsumer(bootstrap_servers=run.settings.kafka_bootstrap, group_id=None)
    await ends.start()
    try:
        await _sample_every(options, ends, partitions, service, origin, state, commit_window,
                            downstream_window, commits)  # fmt: skip
    finally:
        await ends.stop()


async def _sample_every(
    options: Options,
    ends: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    service: Service,
    origin: float,
    state: _State,
    commit_window: summary.Window,
    downstream_window: summary.Window,
    commits: CommitClock,
) -> None:
    tick = origin
    while True:
        tick += options.sample_seconds
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        for name, replica in service.replicas.items():
            code = replica.exit_code()
            if code is not None and not replica.under_fault:
                at = time.monotonic() - origin
                state.problems.append(f"{name} exited on its own with {code} at {at:.0f} s")
                replica.start()
        try:
            end = await ends.end_offsets(partitions)
            lag: int | None = sum(end.values()) - sum(state.positions.values())
        except Exception:
            lag = None
        state.samples.append(
            {
                "t": round(time.monotonic() - origin, 2),
                "processes": service.sample(),
                "latency": {"commit": commit_window.take(), "downstream": downstream_window.take()},
                "lag": lag,
                "sent": state.sending.sent if state.sending else None,
                "awaiting_commit": commits.waiting(),
            }
        )
        last = state.samples[-1]
        if len(state.samples) % max(1, round(60 / options.sample_seconds)) == 0:
            rss = ", ".join(f"{n} {p['rss_mb']} MB" for n, p in last["processes"].items())
            say(
                f"soak: {last['t'] / 60:.1f} min: {rss}; p99 commit "
                f"{last['latency']['commit']['p99_ms']} ms; lag {lag}"
            )


async def _drain(
    engine: AsyncEngine, run: Run, tail: RelayTail, total: int, origin: float, state: _State
) -> float | None:
    """Seconds after the last send until every record is stored, nothing waits and the
    relay published every outbox row; None (and a problem) if not within the timeout."""
    last_send = time.monotonic()
    while time.monotonic() - last_send < DRAIN_TIMEOUT_S:
        seen = await progress(engine, run.settings.group_id)
        if (
            seen.consumed >= total
            and not seen.waiting
            and await published_all(engine, tail.position)
        ):
            return time.monotonic() - last_send
        await asyncio.sleep(0.5)
    state.problems.append(f"not drained {DRAIN_TIMEOUT_S:.0f} s after the last send")
    return None


def _results(
    options: Options,
    state: _State,
    workload: dict[str, int],
    published: int,
    drained_s: float | None,
    problems: list[str],
    commit_window: summary.Window,
    downstream_window: summary.Window,
    forgotten: int,
) -> dict[str, Any]:
    warmup_s = options.warmup_minutes * 60.0
    growths = [
        summary.growth(key, series, warmup_s)
        for key, series in summary.processes(state.samples).items()
    ]
    lags = [(s["t"], s["lag"]) for s in state.samples if s["lag"] is not None]
    floor = round(options.rate)
    recoveries = [summary.recovery_s(lags, f.at_s, f.end_s or f.at_s, floor) for f in state.faults]
    faults = [
        {**f.as_dict(), "recovered_after_s": None if r is None else round(r, 1)}
        for f, r in zip(state.faults, recoveries, strict=True)
    ]
    rss_verdict = summary.verdict(growths)
    sending = state.sending or Sending()
    return {
        "settings": {
            "rate": options.rate,
            "minutes": options.minutes,
            "warmup_minutes": options.warmup_minutes,
            "burst_seconds": options.burst_seconds,
            "sample_seconds": options.sample_seconds,
            "faults": options.faults,
            "fault_schedule": [list(f) for f in SCHEDULE] if options.faults else [],
            "seed": options.seed,
            "partitions": PARTITIONS,
            "growth_tolerance_percent": summary.GROWTH_TOLERANCE * 100,
            "commit_poll_seconds": COMMIT_POLL_S,
        },
        "workload": workload,
        "sending": {
            "sent": sending.sent,
            "failed": sending.failed,
            "seconds": round(sending.seconds, 1),
            "burst": options.burst,
            "achieved_rate": (
                round((sending.sent - options.burst) / sending.seconds, 1)
                if sending.seconds
                else None
            ),
        },
        "drained_after_last_send_seconds": None if drained_s is None else round(drained_s, 1),
        "downstream_events": published,
        "downstream_not_seen_within_s": {"seconds": FORGET_S, "sends": forgotten},
        "latency": {
            "commit": summary.overall(commit_window, state.origin),
            "commit_after_warmup": summary.overall(commit_window, _after(state, warmup_s)),
            "downstream": summary.overall(downstream_window, state.origin),
            "downstream_after_warmup": summary.overall(downstream_window, _after(state, warmup_s)),
        },
        "lag": {
            "max": max((lag for _, lag in lags), default=None),
            "max_after_warmup": max((lag for t, lag in lags if t >= warmup_s), default=None),
            "median": summary.percentile([lag for _, lag in lags], 0.5),
        },
        "processes": [g.as_dict() for g in growths],
        "faults": faults,
        "problems": problems,
        "verdicts": {"rss": rss_verdict, "correct": "pass" if not problems else "fail"},
        "ok": not problems and rss_verdict != "fail",
        "samples": state.samples,
    }


def _after(state: _State, seconds: float) -> float:
    """`seconds` into the soak, on the monotonic clock the latencies were noted on."""
    return state.origin + seconds


async def _remove(base: Settings, database: str, topics: list[str]) -> None:
    """Best effort: drop the soak's database and delete its topics."""
    try:
        await drop_database(base.database_url, database)
        client = AIOKafkaAdminClient(bootstrap_servers=base.kafka_bootstrap)
        await client.start()
        try:
            existing = set(await client.list_topics())
            doomed = [t for t in topics if t in existing]
            if doomed:
                await client.delete_topics(doomed)
        finally:
            await client.close()
    except Exception as error:  # the results stand; only disk space is at stake
        say(f"soak: could not remove all it made: {error}")


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1) + "\n"
