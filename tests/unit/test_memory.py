"""The serving process's memory housekeeping: a trim hands the C heap's free pages back
to the system, and the trimming loop runs until it is told to stop."""

from __future__ import annotations

import asyncio
import ctypes
import platform

import pytest

from sync_service import memory

GLIBC = platform.libc_ver()[0] == "glibc"
PAGE = 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_a_trim_returns_the_free_pages_inside_the_heap() -> None:
    trim = memory.heap_trimmer()
    assert trim is not None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trim()
    # 64 MB in 16 KB chunks (below the mmap threshold: inside the heap), each touched so
    # it is resident; then all but the last freed: the last pins the heap's top, so
    # glibc's own trimming of the top cannot release what lies below it.
    chunks = [libc.malloc(16 * 1024) for _ in range(4096)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, 16 * 1024)
    for chunk in chunks[:-1]:
        libc.free(chunk)
    before = _rss_bytes()
    assert trim() is True
    after = _rss_bytes()
    libc.free(chunks[-1])
    assert before - after > 32 * 1024 * 1024, (before, after)


def test_the_trimming_loop_trims_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    stop = asyncio.Event()

    def counting() -> bool:
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        return False

    monkeypatch.setattr(memory, "heap_trimmer", lambda: counting)

    async def scenario() -> None:
        await asyncio.wait_for(memory.trim_heap(stop, every_s=0.01), timeout=5.0)

    asyncio.run(scenario())
    assert len(calls) >= 3


def test_without_a_trim_the_loop_waits_for_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A part of the service that returns stops the service: it must not return early.
    monkeypatch.setattr(memory, "heap_trimmer", lambda: None)

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(memory.trim_heap(stop, every_s=0.01))
        done, _ = await asyncio.wait([loop], timeout=0.2)
        assert not done
        stop.set()
        await asyncio.wait_for(loop, timeout=1.0)

    asyncio.run(scenario())
