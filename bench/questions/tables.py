"""The figures of a run as the Markdown tables of bench/QUESTIONS.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

Columns = Sequence[tuple[str, str]]
"""(header, key) pairs; a key "a.b" reads row["a"]["b"]."""

BURST_COLUMNS: Final[Columns] = (
    ("pattern", "pattern"),
    ("tasks", "tasks"),
    ("completed", "completed"),
    ("TimeoutError", "timeout_errors"),
    ("wait p50 ms", "wait_p50_ms"),
    ("wait p99 ms", "wait_p99_ms"),
    ("total s", "total_s"),
    ("peak connections", "peak_connections"),
)
PING_COLUMNS: Final[Columns] = (
    ("pool_pre_ping", "setting"),
    ("checkout p50 ms", "checkout_p50_ms"),
    ("checkout p99 ms", "checkout_p99_ms"),
    ("round trips per checkout", "round_trips_per_checkout"),
)
LOAD_COLUMNS: Final[Columns] = (
    ("shape", "shape"),
    ("customers", "parents"),
    ("strategy", "strategy"),
    ("median ms", "median_ms"),
    ("median ms, GC paused", "median_ms_gc_paused"),
    ("statements", "statements"),
    ("round trips", "round_trips"),
    ("rows", "rows"),
    ("KiB from server", "kib_from_server"),
)
COMPARE_COLUMNS: Final[Columns] = (
    ("shape", "shape"),
    ("customers", "parents"),
    ("fastest", "fastest"),
    ("fastest, GC paused", "fastest_gc_paused"),
    ("joined.joined minus selectin.selectin ms, GC paused", "joined_minus_selectin_ms_gc_paused"),
    ("round trips saved by the join", "round_trips_saved_by_join"),
    ("break-even round trip ms", "break_even_round_trip_ms"),
)
CHANGE_COLUMNS: Final[Columns] = (
    ("change", "change"),
    ("mode", "mode"),
    ("outcome", "outcome"),
    ("attempts", "attempts"),
    ("DDL s", "ddl_s"),
    ("writer max ms", "writer_during.max_ms"),
    ("writer p99 ms", "writer_during.p99_ms"),
    ("commits during DDL", "commits_during"),
    ("commits/s before", "commits_per_s_before"),
    ("writer p50 ms before", "writer_before.p50_ms"),
)


SETTING_COLUMNS: Final[Columns] = (
    ("statement in the migration's transaction", "statement"),
    ("lock_timeout there", "in_transaction"),
    ("inside autocommit_block", "inside_autocommit_block"),
    ("after autocommit_block", "after_autocommit_block"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    value: Any = row
    for part in key.split("."):
        value = value[part]
    return "-" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Columns) -> str:
    """A Markdown table of `rows`, one column per (header, key)."""
    lines = [[header for header, _ in columns], ["---"] * len(columns)]
    lines += [[_cell(row, key) for _, key in columns] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def tables(record: dict[str, Any]) -> str:
    """The figures of a run as the Markdown tables of QUESTIONS.md."""
    questions, out = record["questions"], []
    if pool := questions.get("pool"):
        out.append(table(pool["bursts"], BURST_COLUMNS))
        ping = pool["pre_ping"]
        pings = [{"setting": key, **ping[key]} for key in ("without_pre_ping", "with_pre_ping")]
        out.append(table(pings, PING_COLUMNS))
    if loading := questions.get("loading"):
        out.append(table(loading["runs"], LOAD_COLUMNS))
        out.append(table(loading["fastest"], COMPARE_COLUMNS))
    if migrations := questions.get("migrations"):
        out.append(table(migrations["runs"], CHANGE_COLUMNS))
        out.append(table(migrations["lock_timeout_and_autocommit_block"], SETTING_COLUMNS))
    return "\n\n".join(out)
