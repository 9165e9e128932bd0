"""`python -m bench.cpu`: the CPU the consumer's own Python spends per event in the stages
that need no server (decoding, planning, the outbox rows), on the benchmark's workload.

The timed drain shows where a whole run's CPU goes, but only on a quiet machine. This
counts process CPU time (`time.process_time`), which other work on the machine barely
moves, stage by stage, so that a change to one stage can be measured on a busy machine.
Batches are cut as a backlog drain cuts them (`--batch` records in arrival order); the
stored rows `plan` is given come from a dict that plays the target's tables (the rows of
earlier batches, the live emails), and what waits is fed back as the writer does.

With `--instructions plan|outbox` it counts instead the instructions one stage executes
(valgrind's callgrind, switched on only around that stage): a figure no other work on the
machine moves at all, for comparing two versions of a stage.

Invariant: every stage runs the service's own functions on the same changes each round;
the figure of a stage is its best round (the least disturbed), in microseconds per event.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from bench.workload import Topics, Workload
from sync_service.events.change import Change, DeadLetter, Entity, Skipped
from sync_service.memory import tune_gc
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.plan import Plan, Row, needs, plan
from sync_service.pipeline.write import _outbox_row

_LIMITS = Limits(
    max_bytes=1 << 20, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1_024
)
TOPICS = Topics("cdc.users", "cdc.orders")
"""The topics the workload's records are decoded as coming from."""


def records(workload: Workload) -> Iterator[Change | DeadLetter | Skipped]:
    """Every event decoded as the consumer does (offsets as on fresh topics)."""
    offsets: dict[tuple[str, int], int] = {}
    for event in workload.events:
        topic = TOPICS.of(event.entity)
        offset = offsets.get((topic, event.partition), 0)
        offsets[(topic, event.partition)] = offset + 1
        yield decode(entity=event.entity, topic=topic, partition=event.partition,
                     offset=offset, key=event.key, value=event.value, limits=_LIMITS)  # fmt: skip


def decoded(workload: Workload) -> list[Change]:
    """The changes among `records(workload)`."""
    return [found for found in records(workload) if isinstance(found, Change)]


class Target:
    """The target's tables as `plan` sees them: rows by id, live users by email."""

    def __init__(self) -> None:
        self.rows: dict[Entity, dict[int, Row]] = {"user": {}, "order": {}}
        self.emails: dict[str, int] = {}
        self.pending: dict[tuple[Entity, int, int], Change] = {}

    def stored(self, changes: Sequence[Change]) -> dict[Entity, dict[int, Row]]:
        wanted = needs(changes)
        users, orders = self.rows["user"], self.rows["order"]
        found: dict[Entity, dict[int, Row]] = {
            "user": {i: users[i] for i in wanted.user_ids if i in users},
            "order": {i: orders[i] for i in wanted.order_ids if i in orders},
        }
        for email in wanted.emails:
            holder = self.emails.get(email)
            if holder is not None:
                found["user"][holder] = users[holder]
        return found

    def apply(self, done: Plan) -> None:
        for entity, rows in done.rows.items():
            table = self.rows[entity]
            for row in rows:
                if entity == "user":
                    before = table.get(row["id"])
                    if before is not None and self.emails.get(before["email"]) == row["id"]:
                        del self.emails[before["email"]]
                    if row["deleted_at"] is None:
                        self.emails[row["email"]] = row["id"]
                table[row["id"]] = row
        for key in done.unpend:
            self.pending.pop(key, None)
        for waiting in done.wait:
            change = waiting.change
            self.pending[(change.entity, change.id, change.version)] = change


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    found = work()
    return time.process_time() - started, found


def _callgrind(on: bool) -> None:
    """Switch callgrind's counting for this process on or off."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _stage(name: str, counted: str | None, work: Callable[[], Any]) -> tuple[float, Any]:
    """`work`, timed, and counted by callgrind if it is stage `counted`."""
    if name == counted:
        _callgrind(True)
    try:
        return _timed(work)
    finally:
        if name == counted:
            _callgrind(False)


def one_round(
    changes: Sequence[Change], batch: int, counted: str | None = None
) -> dict[str, float]:
    """CPU seconds per stage over all `changes`, cut into batches of `batch`; under
    callgrind, instructions are counted only while stage `counted` runs."""
    target = Target()
    spent = {"plan": 0.0, "outbox": 0.0}
    for start in range(0, len(changes), batch):
        incoming = changes[start : start + batch]
        ids = {(c.entity, c.id) for c in incoming}
        pending = [c for k, c in target.pending.items() if (k[0], k[1]) in ids]
        stored = target.stored([*pending, *incoming])
        seconds, done = _stage("plan", counted, lambda: plan(incoming, pending, stored))  # noqa: B023
        spent["plan"] += seconds
        applied = done.applied
        seconds, _ = _stage(
            "outbox",
            counted,
            lambda: [_outbox_row(a.change, a.row, 1) for a in applied],  # noqa: B023
        )
        spent["outbox"] += seconds
        target.apply(done)
    return spent


def instructions(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run this module under callgrind, counting only `stage`: its instructions per event."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("bench.cpu: --instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as folder:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={folder}/callgrind.out", sys.executable, "-m", "bench.cpu",
            "--events", str(args.events), "--seed", str(args.seed), "--batch", str(args.batch),
            "--counted", stage,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"bench.cpu: callgrind failed: {done.stderr.strip().splitlines()[-1:]}")
    total = int(found.group(1))
    per_event = round(total / args.events)
    return {"stage": stage, "events": args.events, "batch": args.batch,
            "instructions": total, "instructions_per_event": per_event}  # fmt: skip


def measure(workload: Workload, *, batch: int, rounds: int) -> dict[str, Any]:
    """Each stage's best round, in microseconds per event of the workload."""
    tune_gc()
    events = len(workload.events)
    best: dict[str, float] = {}
    changes: list[Change] = []
    for _ in range(rounds):
        gc.collect()
        seconds, changes = _timed(lambda: decoded(workload))
        spent = {"decode": seconds, **one_round(changes, batch)}
        for stage, value in spent.items():
            best[stage] = min(best.get(stage, value), value)
    per_event = {stage: round(value / events * 1e6, 2) for stage, value in best.items()}
    return {
        "events": events,
        "changes": len(changes),
        "batch": batch,
        "rounds": rounds,
        "cpu_us_per_event": per_event,
        "cpu_us_per_event_total": round(sum(per_event.values()), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20_261_124)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--instructions",
        choices=("plan", "outbox"),
        help="count one stage's instructions under callgrind instead (slow: use --events 20000)",
    )
    parser.add_argument("--counted", choices=("plan", "outbox"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.rounds) < 1:
        print("bench.cpu: --events, --batch and --rounds must be above 0", file=sys.stderr)
        return 2
    if args.instructions is not None:
        found = instructions(args.instructions, args)
        sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    workload = Workload.generate(args.events, seed=args.seed)
    if args.counted is not None:  # the child `instructions` runs under callgrind
        one_round(decoded(workload), args.batch, counted=args.counted)
        return 0
    found = measure(workload, batch=args.batch, rounds=args.rounds)
    sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
