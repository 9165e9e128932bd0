"""How a serving process uses memory: when Python's cycle collector runs, and handing the
heap's free pages back to the system.

Invariant: neither changes what the pipeline computes; both only bound what the process
holds once the objects of a batch are gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable

from sync_service.retry import wait_any

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 100_000
"""Container objects allocated (net of those freed) before the youngest generation is
collected; CPython's default is 700. The pipeline's objects die by reference counting
within a batch or two, so collecting every 700 only walked live data, and promoted it:
a full collection (~70 ms) followed every ~6,000 events. In 200k-event drains the
collector took 30% of the consumer's CPU; at this threshold it ran once (25 ms) in a
200k drain (consumer CPU per event -25 to -40%, same peak RSS; bench/README.md). Cyclic
garbage is still collected, after this many objects of it."""

TRIM_EVERY_S = 30.0
"""How often free pages inside the C heap go back to the system. glibc returns only the
top of its heap by itself; the free chunks a backlog or a takeover of more partitions
leaves inside it stayed resident (14 MB of a consumer's 140 MB in a soak, every MB of it
released by one trim). A trim of a 40 MB heap with half of it free in holes took 0.5-2 ms
here: every 30 s, under a ten-thousandth of the loop's time."""


def tune_gc() -> None:
    """Move everything alive after start-up (modules, classes, the ORM's and Pydantic's
    schemas) out of the cycle collector's reach, and collect young objects only after
    `GC_YOUNG_THRESHOLD` of them: none of the start-up objects is ever garbage, and the
    pipeline's own objects are freed by reference counting. For a process that runs the
    pipeline until it stops (the CLI's serving commands)."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def heap_trimmer() -> Callable[[], bool] | None:
    """glibc's `malloc_trim(0)` (True when it released memory), or None where the C
    library has none (musl, macOS): there the heap is left to the allocator."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


async def trim_heap(stop: asyncio.Event, every_s: float = TRIM_EVERY_S) -> None:
    """Until `stop` is set, hand the C heap's free pages back to the system every
    `every_s` seconds. Without a trim it only waits: a part of the service that ends
    stops the others."""
    trim = heap_trimmer()
    if trim is None:
        await stop.wait()
        return
    while True:
        await wait_any([stop], every_s)
        if stop.is_set():
            return
        started = time.perf_counter()
        released = trim()
        log.debug(
            "heap trimmed",
            extra={"released": released, "ms": round(1000 * (time.perf_counter() - started), 2)},
        )
