"""The stalled-transaction check runs until it is told to stop: every second while the
idle timeout is on, not at all while it is off, and no more once it is refused."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError

from sync_service.db import stalls


class _Refused(Exception):
    """What PostgreSQL says to a role that may not end another's backend."""


def _count_calls(
    monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None
) -> list[float]:
    calls: list[float] = []

    async def end_stalled(engine: Any, after_s: float) -> int:
        calls.append(after_s)
        if error is not None:
            raise error
        return 0

    monkeypatch.setattr(stalls, "end_stalled", end_stalled)
    return calls


async def _run_for(seconds: float, after_ms: int) -> None:
    stop = asyncio.Event()
    watching = asyncio.create_task(stalls.watch_stalls(None, after_ms, stop, every_s=0.01))  # type: ignore[arg-type]
    await asyncio.sleep(seconds)
    assert not watching.done(), "a part that returns stops the service"
    stop.set()
    await asyncio.wait_for(watching, 1)


async def test_it_checks_repeatedly_with_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    await _run_for(0.2, after_ms=5_000)
    assert len(calls) > 3
    assert set(calls) == {5.0}


async def test_it_never_checks_with_the_idle_timeout_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    await _run_for(0.1, after_ms=0)
    assert calls == []


async def test_a_refusal_is_said_once_and_ends_the_checks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = DBAPIError("SELECT", {}, _Refused("permission denied to terminate process"))
    calls = _count_calls(monkeypatch, refused)
    with caplog.at_level(logging.WARNING, logger=stalls.__name__):
        await _run_for(0.2, after_ms=5_000)
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "stalled transactions will not be ended: _Refused: permission denied to terminate process"
    ]


async def test_a_transient_failure_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch, OSError("connection refused"))
    await _run_for(0.2, after_ms=5_000)
    assert len(calls) > 3
