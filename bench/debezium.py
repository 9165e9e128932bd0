"""The benchmark's workload as Debezium's PostgreSQL connector writes it, for a drain of the
service with `SYNC_INBOUND_FORMAT=debezium`; and the decoders' cost per event, alone.

Invariant: `as_debezium(w)` holds the same changes as `w` in the same delivery order and
partitions (each native `version` becomes the change's `lsn`), so `w.expected` is still
the state a correct drain ends in; a value that is not an envelope stays as it is, and a
bad event stays bad.

    .venv/bin/python -m bench.debezium --events 20000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace

import orjson

from bench.workload import Topics, Workload
from sync_service.events.change import Change
from sync_service.events.debezium import DebeziumEncoder, DecimalMode
from sync_service.ops.traffic import Event
from sync_service.pipeline.decode import Limits, decoder_for

_LIMITS = Limits(max_bytes=1 << 20, max_depth=8, dead_letter_value_bytes=0, dead_letter_key_bytes=0)


def as_debezium(
    workload: Workload, *, schemas: bool = True, decimals: DecimalMode = "precise"
) -> Workload:
    """`workload` with every event's key and value written as the connector would."""
    return replace(workload, events=encode(workload.events, schemas=schemas, decimals=decimals))


def encode(
    events: Sequence[Event], *, schemas: bool = True, decimals: DecimalMode = "precise"
) -> list[Event]:
    """Each event's key and value as the connector writes them (with schemas and precise
    decimals by default: its common settings); a value that is no envelope stays as is."""
    encoder = DebeziumEncoder(prefix="bench", schemas=schemas, decimals=decimals)
    encoded = []
    for event in events:
        record = encoder.from_native(event.value)
        key, value = record or (encoder.key(event.entity, event.id), event.value)
        encoded.append(replace(event, key=key, value=value))
    return encoded


def event_ids(workload: Workload, topics: Topics) -> list[str | None]:
    """Each event's inbound `event_id` as the Debezium decoder derives it (from the
    change's position, not the native envelope's); None for one that is dead-lettered."""
    decode = decoder_for("debezium")
    ids: list[str | None] = []
    for event in workload.events:
        decoded = decode(
            entity=event.entity, topic=topics.of(event.entity), partition=event.partition,
            offset=0, key=event.key, value=event.value, limits=_LIMITS,
        )  # fmt: skip
        ids.append(str(decoded.event_id) if isinstance(decoded, Change) else None)
    return ids


def decode_cost(workload: Workload, inbound_format: str, rounds: int = 3) -> float:
    """Microseconds per event to decode the whole workload, the best of `rounds`."""
    decode = decoder_for(inbound_format)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for event in workload.events:
            decode(
                entity=event.entity, topic="t", partition=event.partition, offset=0,
                key=event.key, value=event.value, limits=_LIMITS,
            )  # fmt: skip
        best = min(best, time.perf_counter() - started)
    return best / len(workload.events) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    native = Workload.generate(args.events, seed=args.seed)
    result: dict[str, float] = {"native": decode_cost(native, "native")}
    for schemas in (True, False):
        for decimals in ("precise", "string"):
            converted = as_debezium(native, schemas=schemas, decimals=decimals)
            name = f"debezium {'schemas' if schemas else 'plain'} {decimals}"
            size = sum(len(e.value) for e in converted.events) / len(converted.events)
            result[name] = decode_cost(converted, "debezium")
            result[f"{name} bytes"] = size
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
