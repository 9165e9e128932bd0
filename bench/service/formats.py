"""Input formats the service's drain can be timed in: the workload's events re-encoded as
another format carries them, drained by the service told that format
(`SYNC_INBOUND_FORMAT`), checked as the native drain is.

A format joins the benchmark by one entry in `FORMATS` (and its phase name in
`bench.report.PHASES`): an `InboundFormat` whose `encode` turns the workload's events into
the records to produce. Until a format is registered, its phase is reported as skipped.

Invariant: an encoding means the same changes, in the same order and partitions, so the
drain is held to the workload's own expected state: one record per event (an event meant
to be dead-lettered stays one that must be), plus any records the format adds that carry
no change (a tombstone after a delete), which must be neither applied nor dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from bench import debezium
from bench.progress import say
from bench.report import Phase
from bench.service.names import Bench, Run
from bench.service.phase import drain
from bench.workload import Produced, Workload, produce_backlog
from sync_service.ops.traffic import Event


@dataclass(frozen=True)
class InboundFormat:
    name: str
    """The service's name for it: the value of `SYNC_INBOUND_FORMAT`."""
    encode: Callable[[Sequence[Event]], Sequence[Produced]]


def native(events: Sequence[Event]) -> Sequence[Produced]:
    """The workload as generated: the service's own envelopes."""
    return events


FORMATS: Final[dict[str, InboundFormat]] = {
    "native": InboundFormat("native", native),
    "debezium": InboundFormat("debezium", debezium.encode),
}


async def run_format(bench: Bench, workload: Workload, name: str) -> Phase:
    """The service draining the workload encoded as format `name`, on topics of its own,
    into empty tables; skipped while no such format is registered."""
    form = FORMATS.get(name)
    if form is None:
        missing = f"no encoder for the {name} format in bench.service.formats"
        return Phase(name, status="skipped", notes=[missing])
    records = form.encode(workload.events)
    fresh = bench.fresh(name)
    run = Run(fresh.prefix, fresh.settings, form.name)
    await bench.create_topics(run, workload.partitions)
    say(f"{name}: producing {len(records):,} records in the {form.name} format")
    await produce_backlog(bench.bootstrap, run.topics, records)
    await bench.database.reset()
    phase = await drain(bench, workload, run, name=name, records=len(records))
    phase.figures["records"] = len(records)
    return phase
