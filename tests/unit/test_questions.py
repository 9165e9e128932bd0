"""The measuring parts of `bench.questions` that need no server: the wire counter's message
splitting, the percentiles and windows its figures come from, and the tables it prints."""

from __future__ import annotations

import argparse

import pytest
from sqlalchemy import exc as sa_exc

from bench.questions.__main__ import _only
from bench.questions.figures import first_line, latency_summary, overlapping
from bench.questions.tables import table
from bench.questions.wire import BackendMessages, Wire
from bench.report import percentile


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


# One extended-query exchange as PostgreSQL answers it: bind and row description, three
# rows, the command tag, ready for query; then a second request's answer with no rows.
STREAM = b"".join(
    [
        _message(b"2"),
        _message(b"T", b"\x00\x01id\x00" + bytes(18)),
        *(_message(b"D", b"\x00\x01\x00\x00\x00\x01" + str(n).encode()) for n in range(3)),
        _message(b"C", b"SELECT 3\x00"),
        _message(b"Z", b"I"),
        _message(b"C", b"BEGIN\x00"),
        _message(b"Z", b"T"),
    ]
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, len(STREAM)])
def test_messages_are_counted_however_tcp_cuts_the_stream(size: int) -> None:
    wire = Wire()
    messages = BackendMessages(wire)
    for at in range(0, len(STREAM), size):
        messages.feed(STREAM[at : at + size])
    assert (wire.rows, wire.round_trips) == (3, 2)


def test_a_message_is_counted_only_once_complete() -> None:
    wire = Wire()
    messages = BackendMessages(wire)
    row = _message(b"D", b"\x00\x00")
    messages.feed(row[:-1])
    assert wire.rows == 0
    messages.feed(row[-1:])
    assert wire.rows == 1


def test_wire_since_is_the_difference() -> None:
    assert Wire(10, 200, 7, 3).since(Wire(4, 50, 2, 1)) == Wire(6, 150, 5, 2)


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(100, 0, -1)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_overlapping_keeps_spans_that_touch_the_window() -> None:
    spans = [(0.0, 1.0), (1.0, 2.0), (2.5, 3.0), (3.5, 9.0), (9.5, 10.0), (0.0, 10.0)]
    assert overlapping(spans, 2.0, 4.0) == [(1.0, 2.0), (2.5, 3.0), (3.5, 9.0), (0.0, 10.0)]


def test_latency_summary_in_milliseconds() -> None:
    assert latency_summary([(0.0, 0.002), (1.0, 1.5), (2.0, 2.004)]) == {
        "count": 3,
        "p50_ms": 4.0,
        "p99_ms": 500.0,
        "max_ms": 500.0,
    }
    assert latency_summary([]) == {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


def test_first_line_drops_the_link_to_the_docs() -> None:
    error = sa_exc.TimeoutError(
        "QueuePool limit of size 5 overflow 5 reached, connection timed out, timeout 2.00"
    )
    error.code = "3o7r"
    assert first_line(error) == (
        "TimeoutError: QueuePool limit of size 5 overflow 5 reached, connection timed out, "
        "timeout 2.00"
    )


def test_table_reads_nested_keys_and_shows_missing_figures_as_a_dash() -> None:
    rows = [{"name": "a", "during": {"max_ms": 1.5}}, {"name": "b", "during": {"max_ms": None}}]
    assert table(rows, [("name", "name"), ("max ms", "during.max_ms")]) == "\n".join(
        ["| name | max ms |", "| --- | --- |", "| a | 1.5 |", "| b | - |"]
    )


def test_only_accepts_the_questions_and_nothing_else() -> None:
    assert _only("pool, migrations") == ("pool", "migrations")
    with pytest.raises(argparse.ArgumentTypeError, match="choose from pool, loading, migrations"):
        _only("pool,nplus1")
