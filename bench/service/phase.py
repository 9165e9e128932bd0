"""The service's drains: the service started on a pre-loaded backlog, timed from the
moment it is up until every record is stored and published, then checked. The
sync_service phase is one into empty tables; the grown target and other input formats
(`bench.service.grown`, `bench.service.formats`) are drains too.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from bench.progress import say
from bench.report import Phase
from bench.service.check import check_target, count_downstream
from bench.service.names import Bench, Run
from bench.service.process import ServiceProcess
from bench.service.usage import Usage
from bench.service.watch import RelayTail, end_offsets, watch
from bench.workload import Workload, produce_backlog
from sync_service.config import Settings


async def load_backlog(bench: Bench, workload: Workload) -> tuple[Run, float]:
    """Fresh topics holding the whole workload, read by sync_service and the baselines;
    returns the run that owns them and the seconds producing took."""
    run = bench.fresh("backlog")
    await bench.create_topics(run, workload.partitions)
    say(f"backlog: producing {len(workload.events):,} events to {run.prefix}.cdc.*")
    seconds = await produce_backlog(bench.bootstrap, run.topics, workload.events)
    held = sum((await end_offsets(bench.bootstrap, [run.topics.users, run.topics.orders])).values())
    if held != len(workload.events):
        raise RuntimeError(f"the topics hold {held:,} records, not {len(workload.events):,}")
    return run, seconds


async def run_sync_service(
    bench: Bench, workload: Workload, run: Run, *, profile: Path | None = None
) -> Phase:
    """The service on the pre-loaded backlog of `run`, into empty tables."""
    await bench.database.reset()
    return await drain(bench, workload, run, name="sync_service", profile=profile)


async def drain(
    bench: Bench,
    workload: Workload,
    run: Run,
    *,
    name: str,
    profile: Path | None = None,
    ids: tuple[int, int] | None = None,
    records: int | None = None,
) -> Phase:
    """Start the service on the backlog of `run` (in `run.inbound_format`: `records` on its
    topics, one per event unless told), time it from the moment it is up until all is
    stored and published, and check the result: the tables' rows with ids within `ids`
    (all when None) against the workload's expected state."""
    phase = Phase(name)
    total = len(workload.events) if records is None else records
    service = ServiceProcess(run, bench.logs / f"{name}.log", profile)
    tail = RelayTail(run.settings)
    await tail.start()
    spawned = time.monotonic()
    usage = Usage(service.start())
    usage.start()
    try:
        with contextlib.suppress(RuntimeError):  # `watch` reports a service that never came up
            await service.wait_ready()
        ready = time.monotonic()
        cpu_at_ready = service.cpu_seconds()
        timeline = await watch(service, bench.database.engine, tail, total, name)
        metrics = await service.metrics() if timeline.problem is None else {}
        spent = usage.stop()
        by_role = {
            role: round(seconds - cpu_at_ready.get(role, 0.0), 2)
            for role, seconds in service.cpu_seconds().items()
        }
        rss_by_role = service.peak_rss()
    finally:
        exit_code = service.stop()
        await tail.stop()
    if timeline.problem is not None or timeline.done is None or timeline.first_commit is None:
        phase.status, phase.problems = "failed", [timeline.problem or "did not finish"]
        return phase
    downstream = await count_downstream(bench.bootstrap, run.out_topics)
    phase.problems = await check_target(
        bench.database.engine,
        workload.expected,
        downstream,
        metrics.get("sync_changes_applied_total"),
        ids=ids,
    )
    if exit_code != 0:
        phase.problems.append(f"the service exited with {exit_code} on SIGTERM: see {service.logs}")
    phase.status = "wrong" if phase.problems else "ok"
    # The window opens once the service is up (schema checked, partitions assigned, relay
    # leading): the drain itself, without the process start and the group join.
    phase.events = len(workload.events)  # the rate is of events, whatever carried them
    phase.seconds = timeline.done - ready
    if not phase.problems:
        phase.notes.append("checksum, dead letters, outbox count, no doubles: as expected")
    phase.figures = {
        "events_total": phase.events,
        "records_total": total,
        "startup_seconds": round(ready - spawned, 2),
        "first_commit_after_start_seconds": round(timeline.first_commit - spawned, 2),
        "stored_at_first_commit": timeline.consumed_at_first,
        "consumed_all_after_start_seconds": round(
            (timeline.consumed_all or timeline.done) - spawned, 2
        ),
        "done_after_start_seconds": round(timeline.done - spawned, 2),
        "events_per_s_including_startup": round(phase.events / (timeline.done - spawned), 1),
        "downstream_events": downstream.messages,
        "peak_rss_bytes": max(spent["peak_rss_bytes"], spent["rss_high_water_mark_bytes"] or 0),
        "usage": spent,
        "cpu_seconds_by_role": by_role,
        "peak_rss_bytes_by_role": rss_by_role,
        "service_metrics": selected_metrics(metrics),
        "service_settings": service_settings(run.settings),
        "inbound_format": run.inbound_format,
        "profiled": profile is not None,
        "logs": service.logs,
    }
    return phase


def service_settings(settings: Settings) -> dict[str, Any]:
    """The settings that shape the service's speed, as it ran."""
    names = {"batch_max_events", "batch_max_wait_ms", "poll_max_records", "pending_retry_ms",
             "pool_size", "relay_chunk", "relay_poll_ms", "relay_prune_every_s"}  # fmt: skip
    return settings.model_dump(include=names)


def selected_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The service's own counters that explain where its time went."""
    names = (
        "sync_events_consumed_total",
        "sync_changes_applied_total",
        "sync_changes_stale_total",
        "sync_changes_waited_total",
        "sync_dead_letters_total",
        "sync_outbox_published_total",
        "sync_batch_records_sum",
        "sync_batch_records_count",
        "sync_batch_write_seconds_sum",
        "sync_batch_write_seconds_count",
        "sync_relay_publish_seconds_sum",
        "sync_relay_publish_seconds_count",
        "sync_transient_failures_total",
    )
    return {name: round(metrics[name], 3) for name in names if name in metrics}
