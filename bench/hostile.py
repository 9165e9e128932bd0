"""`python -m bench.hostile`: the CPU that decoding costs for each kind of hostile message.

Each message of `corpus` (the ones the fault suite sends through Kafka) and of
`slow_paths` is decoded `--runs` times with the default limits; the table shows the CPU
time of one decode (this thread's, so other processes on a loaded machine do not count),
its median and its maximum, beside a valid event's, and the dead-letter kind it got.
`many_containers` follows, apart. Exit status 1 when a message got another kind than
expected, or one of the first table took `--budget-ms` or more.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import orjson
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from sync_service.config import Settings
from sync_service.events.change import DeadLetter
from sync_service.pipeline.decode import Limits, decode
from sync_service.pipeline.write import storable_text

MB = 1 << 20


class Hostile(NamedTuple):
    """One message meant to be dead-lettered, and the kind it must get."""

    name: str
    key: bytes | None
    value: bytes | None
    kind: str


def envelope(user_id: int, version: int) -> dict[str, object]:
    """A valid user upsert (CONTRACT section 1)."""
    return {
        "event_id": f"00000000-0000-4000-8000-{user_id:012d}",
        "entity": "user",
        "op": "upsert",
        "version": version,
        "occurred_at": "2026-11-24T10:00:00.123Z",
        "data": {
            "id": user_id,
            "email": f"user{user_id}@example.com",
            "name": f"User {user_id}",
            "active": True,
            "country": "GB",
            "created_at": "2026-01-02T03:04:05Z",
            "updated_at": "2026-11-24T10:00:00.123Z",
        },
    }


def corpus(user_id: int = 7, seed: int = 13) -> list[Hostile]:
    """The hostile messages of the fault suite, each otherwise a valid upsert of `user_id`
    (so that only what is named is wrong)."""
    good = orjson.dumps(envelope(user_id, 1))
    key = str(user_id).encode()
    head, tail = good[:-1], b"}"  # to add a field at the end of the envelope
    nulls = {name: None for name in envelope(user_id, 1)}
    no_entity = {k: v for k, v in envelope(user_id, 1).items() if k != "entity"}
    return [
        Hostile(
            "10 MB value", key, head + b',"pad":"' + b"x" * (10 * MB) + b'"' + tail, "oversized"
        ),
        Hostile(
            "100,000-deep nesting",
            key,
            head + b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + tail,
            "too_deep",
        ),
        Hostile(
            "1,000,000-digit version",
            key,
            good.replace(b'"version":1', b'"version":' + b"9" * 1_000_000),
            "invalid",
        ),
        Hostile("invalid UTF-8", key, good.replace(b"User ", b"User \xff\xfe"), "not_json"),
        Hostile("NaN version", key, good.replace(b'"version":1', b'"version":NaN'), "not_json"),
        Hostile("null fields", key, orjson.dumps(nulls), "invalid"),
        # PostgreSQL's text cannot hold U+0000: not in a row, nor in a dead letter's reason.
        Hostile("NUL in a name", key, good.replace(b'"User ', b'"User \\u0000'), "invalid"),
        Hostile("NUL in the op", key, good.replace(b'"upsert"', b'"up\\u0000sert"'), "invalid"),
        Hostile("no entity", key, orjson.dumps(no_entity), "invalid"),
        Hostile("null value (tombstone)", key, None, "empty"),
        Hostile("no key", None, good, "bad_key"),
        Hostile("1 MB key", b"7" * MB, good, "bad_key"),
        Hostile("random bytes (64 KiB)", key, random.Random(seed).randbytes(64 * 1024), "not_json"),
    ]


def slow_paths() -> list[Hostile]:
    """About a megabyte each, of what makes a careless scan of a failed parse slow (one
    that restarts at every quote, say, is quadratic in the size)."""
    return [
        Hostile("1 MB of escaped quotes", b"7", b'{"a":"' + b'\\"' * 500_000, "not_json"),
        Hostile(
            "1 MB of escaped quotes and brackets",
            b"7",
            b'{"a":"' + b'\\"[' * 333_333,
            "not_json",
        ),
        Hostile("1 MB of brackets in a string", b"7", b'{"a":"' + b"[" * (MB - 6), "not_json"),
        Hostile(
            "1 MB of brackets in a string, then NaN",
            b"7",
            b'{"a":"' + b"[" * (MB - 20) + b'","b":NaN}',
            "not_json",
        ),
        Hostile("1 MB of numbers too large", b"7", b"[" + b"1e999," * 170_000 + b"1]", "invalid"),
    ]


def many_containers() -> list[Hostile]:
    """A megabyte of small containers each: what costs the most to decode, because the
    schema's reader builds all of them (the more when the envelope fails at its `op`,
    whose error carries the whole input). Shown apart, without a budget: its cost grows
    with SYNC_MAX_MESSAGE_BYTES, which is the lever (a change event is ~300 bytes)."""
    good = orjson.dumps(envelope(7, 1))
    wide = b"[" + b"[[[[[[]]]]]]," * 80_000 + b"[]]"
    return [
        Hostile(
            "valid, with 1 MB of containers", b"7", good[:-1] + b',"x":' + wide + b"}", "applied"
        ),
        Hostile("1 MB of containers, no op", b"7", b'{"x":' + wide + b"}", "invalid"),
    ]


class Figure(NamedTuple):
    name: str
    size: int
    kind: str
    median_ms: float
    max_ms: float
    reason: str


def measure(messages: Sequence[Hostile], limits: Limits, runs: int) -> list[Figure]:
    """Each message decoded `runs` times: its kind, and the CPU time of one decode."""
    figures = []
    for message in messages:
        times, kind, reason = [], "", ""
        gc.collect()  # a collection is no one message's cost (the service runs them rarely)
        gc.disable()
        for offset in range(runs):
            started = time.thread_time_ns()
            result = decode(
                entity="user",
                topic="cdc.users",
                partition=0,
                offset=offset,
                key=message.key,
                value=message.value,
                limits=limits,
            )
            times.append((time.thread_time_ns() - started) / 1e6)
            kind = result.kind if isinstance(result, DeadLetter) else "applied"
            reason = result.reason if isinstance(result, DeadLetter) else ""
        gc.enable()
        size = len(message.value or b"") + len(message.key or b"")
        figures.append(
            Figure(message.name, size, kind, statistics.median(times), max(times), reason)
        )
    return figures


def record_batch_ms(value: bytes, runs: int) -> float:
    """Median CPU time for aiokafka to read one record batch holding `value` and check its
    CRC, as the consumer does with what it fetches (decoding aside)."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1,
        base_sequence=-1, batch_size=len(value) + 1024,
    )  # fmt: skip
    builder.append(0, timestamp=None, key=b"7", value=value, headers=[])
    fetched = bytes(builder.build())
    times = []
    for _ in range(runs):
        started = time.thread_time_ns()
        batch = MemoryRecords(fetched).next_batch()
        if batch is None or not batch.validate_crc():
            raise RuntimeError("the record batch did not read back")
        if [len(record.value or b"") for record in batch] != [len(value)]:
            raise RuntimeError("the record did not read back whole")
        times.append((time.thread_time_ns() - started) / 1e6)
    return statistics.median(times)


def table(figures: Sequence[Figure]) -> str:
    lines = [
        "| message | bytes | kind | CPU per decode, median | max | reason |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for f in figures:
        reason = storable_text(f.reason)  # as stored
        reason = reason if len(reason) <= 70 else reason[:69] + "…"
        lines.append(
            f"| {f.name} | {f.size:,} | `{f.kind}` | {f.median_ms:.3f} ms | {f.max_ms:.3f} ms "
            f"| {reason.replace('|', '/')} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="decodes per message")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="CPU per decode, at most")
    args = parser.parse_args(argv)
    limits = Limits.of(Settings())
    messages = [*corpus(), *slow_paths()]
    valid = Hostile("a valid upsert, for scale", b"7", orjson.dumps(envelope(7, 1)), "applied")
    figures = measure([valid, *messages], limits, args.runs)
    print(table(figures))
    apart = many_containers()
    apart_figures = measure(apart, limits, args.runs)
    print("\nWithout a budget:\n")
    print(table(apart_figures))
    fetched = record_batch_ms(messages[0].value or b"", args.runs)
    print(f"\nReading the {messages[0].name}'s record batch (aiokafka, CRC checked): "
          f"{fetched:.1f} ms median.")  # fmt: skip
    wrong = [
        f"{f.name}: {f.kind}, expected {m.kind}"
        for f, m in zip([*figures, *apart_figures], [valid, *messages, *apart], strict=True)
        if f.kind != m.kind
    ]
    slow = [f"{f.name}: {f.max_ms:.1f} ms" for f in figures if f.max_ms >= args.budget_ms]
    for line in wrong + slow:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if wrong or slow else 0


if __name__ == "__main__":
    sys.exit(main())
