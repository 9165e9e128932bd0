"""Outages told once, with a fake clock: the first failure is one line naming the cause,
a summary follows at most every `summary_every_s`, one line says it is back; aiokafka's
connection errors (dozens a second while a broker is down) are counted, not written,
but an authentication failure reaches the log once per interval; every retry line names
its cause, an error without a message by its type and what was being done."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from sync_service.observability import outages
from sync_service.retry import Backoff, Transient, retrying


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    clock = Clock()
    outages.configure(summary_every_s=10.0, clock=clock)
    yield clock
    outages.configure(summary_every_s=30.0)


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.INFO]


def test_an_outage_is_one_line_then_summaries_then_one_line(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    kafka = outages.current().kafka
    for _ in range(65 * 25):  # 25 s of aiokafka's pace
        kafka.failed("KafkaConnectionError: Unable to bootstrap", doing="relay")
        clock.now += 1 / 65
    kafka.recovered()  # answers must hold for a while before it is told over
    clock.now += outages.RECOVERY_GRACE_S
    kafka.recovered()
    kafka.recovered()  # a further success says nothing more
    lines = _lines(caplog)
    assert [r.getMessage() for r in lines] == [
        "Kafka unreachable",
        "Kafka still unreachable",
        "Kafka still unreachable",
        "Kafka reachable again",
    ]
    first, summary, _, back = lines
    assert first.cause == "KafkaConnectionError: Unable to bootstrap"  # type: ignore[attr-defined]
    assert first.doing == "relay"  # type: ignore[attr-defined]
    assert first.levelno == logging.WARNING
    assert summary.down_s == pytest.approx(10.0, abs=0.1)  # type: ignore[attr-defined]
    assert summary.failures == 651  # type: ignore[attr-defined]
    assert back.levelno == logging.INFO
    assert back.down_s == pytest.approx(25.0, abs=0.1)  # type: ignore[attr-defined]
    assert back.failures == 65 * 25  # type: ignore[attr-defined]
    assert not kafka.down


def test_library_connection_errors_fold_into_the_outage(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    library = outages.LibraryErrors(clock=clock)
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 39092)")
    written = 0
    for _ in range(20 * 65):
        for template, args in (
            ("Unable connect to node with id %s: %s", (1, refused)),
            ("Unable to update metadata from %s", ([1],)),
        ):
            record = logging.LogRecord(
                "aiokafka.client", logging.ERROR, __file__, 1, template, args, None
            )
            written += library.filter(record)
        clock.now += 1 / 65
    assert written == 0
    lines = _lines(caplog)
    assert [r.getMessage() for r in lines][:1] == ["Kafka unreachable"]
    assert len(lines) == 2  # the first line and one summary in 20 s
    assert "Connect call failed" in lines[0].cause  # type: ignore[attr-defined]
    outages.current().kafka.recovered()
    clock.now += outages.RECOVERY_GRACE_S
    outages.current().kafka.recovered()
    back = _lines(caplog)[-1]
    assert back.failures == 20 * 65  # type: ignore[attr-defined]
    assert back.hidden == 20 * 65  # type: ignore[attr-defined]


def test_an_authentication_failure_reaches_the_log_once_per_interval(clock: Clock) -> None:
    library = outages.LibraryErrors(clock=clock)
    failure = SaslAuthenticationFailed("Authentication failed: Invalid username or password")

    def write() -> bool:
        record = logging.LogRecord(
            "aiokafka.conn", logging.ERROR, __file__, 1, "Unable connect: %s", (failure,), None
        )
        return library.filter(record)

    assert write()
    assert not write()
    clock.now += 5
    assert not write()
    clock.now += 6
    assert write()
    other = logging.LogRecord("sync_service.x", logging.ERROR, __file__, 1, "ours", (), None)
    assert library.filter(other)
    assert library.filter(other)


async def test_retry_lines_name_their_cause(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    failures: list[BaseException] = [Transient("the email is still held"), TimeoutError()]

    async def work() -> str:
        if failures:
            with outages.step(outages.KAFKA, "publishing 3 outbox rows"):
                raise failures.pop(0)
        with outages.step(outages.KAFKA, "publishing 3 outbox rows"):
            return "done"

    assert await retrying("relay", work, Backoff(0.001, 0.001)) == "done"
    clock.now += outages.RECOVERY_GRACE_S
    assert await retrying("relay", work, Backoff(0.001, 0.001)) == "done"
    retry, down, back = _lines(caplog)
    assert retry.getMessage() == "relay failed, retrying"
    assert retry.cause == (  # type: ignore[attr-defined]
        "Transient: the email is still held (while publishing 3 outbox rows)"
    )
    assert retry.attempt == 1  # type: ignore[attr-defined]
    assert down.getMessage() == "Kafka unreachable"
    assert down.cause == "TimeoutError (while publishing 3 outbox rows)"  # type: ignore[attr-defined]
    assert back.getMessage() == "Kafka reachable again"


async def test_the_stage_names_the_dependency_of_a_bare_connection_error(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    failures: list[BaseException] = [ConnectionRefusedError(111, "Connect call failed")] * 3

    async def work() -> None:
        if failures:
            raise failures.pop()

    await retrying("write batch", work, Backoff(0.001, 0.001), on=outages.POSTGRESQL)
    clock.now += outages.RECOVERY_GRACE_S
    await retrying("write batch", work, Backoff(0.001, 0.001), on=outages.POSTGRESQL)
    assert [r.getMessage() for r in _lines(caplog)] == [
        "PostgreSQL unreachable",
        "PostgreSQL reachable again",
    ]
    assert outages.dependency_of(KafkaConnectionError()) == outages.KAFKA
    assert outages.is_connection_failure(TimeoutError())
    assert not outages.is_connection_failure(SaslAuthenticationFailed())
    assert not outages.is_connection_failure(ssl.SSLCertVerificationError("Hostname mismatch"))


def test_one_broker_of_several_down_is_one_outage_not_a_flap(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The other brokers answer every 0.1 s while the client fails to reach one of them
    every 0.5 s: one outage with its summaries, over only once the failures stop."""
    caplog.set_level(logging.INFO)
    kafka = outages.current().kafka
    for tick in range(300):  # 30 s
        if tick % 5 == 0:
            kafka.failed("Unable connect to node with id 2: [Errno 111] Connect call failed")
        kafka.recovered()
        clock.now += 0.1
    assert [r.getMessage() for r in _lines(caplog)] == ["Kafka unreachable"] + [
        "Kafka still unreachable"
    ] * 2
    for _ in range(60):  # node 2 is back: only answers from now on
        kafka.recovered()
        clock.now += 0.1
    back = _lines(caplog)[-1]
    assert back.getMessage() == "Kafka reachable again"
    assert back.down_s == pytest.approx(29.6, abs=0.15)  # type: ignore[attr-defined]
