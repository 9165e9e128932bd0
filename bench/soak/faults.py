"""The faults a soak injects, only ever into the service's own processes: a consumer
replica killed -9 and started again, the relay stopped by SIGTERM and started again, a
consumer replica frozen by SIGSTOP (as a VM stall or a long pause would) and woken.

Invariant: each fault is recorded with its times on the soak's clock, whatever happened.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.soak.service import Service

FREEZE_S = 20.0
"""How long a frozen replica stays stopped: past the group's session timeout (10 s), so
the group moves its partitions and the replica is fenced when it wakes."""
RESTART_AFTER_S = 2.0
"""A killed process is started again after this pause, as a supervisor would."""
SCHEDULE = (
    (0.30, "kill -9", "consume-1"),
    (0.50, "SIGTERM + restart", "relay"),
    (0.70, f"SIGSTOP {FREEZE_S:.0f} s + SIGCONT", "consume-2"),
)
"""When (as a share of the sending time) each fault starts: far enough apart that each
recovers before the next, and late enough that the first one starts after the warm-up."""


@dataclass
class Fault:
    kind: str
    target: str
    at_s: float
    """When it started, in seconds since the sending started."""
    end_s: float | None = None
    """When the process was back (started again, or woken)."""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


async def inject(service: Service, origin: float, seconds: float, faults: list[Fault]) -> None:
    """Inject `SCHEDULE` over a sending time of `seconds` that began at `origin`, appending
    each fault to `faults` as it starts."""
    for share, kind, target in SCHEDULE:
        await asyncio.sleep(max(0.0, origin + share * seconds - time.monotonic()))
        replica = service.replicas[target]
        fault = Fault(kind, target, time.monotonic() - origin)
        faults.append(fault)
        replica.under_fault = True
        if kind == "kill -9":
            replica.signal(signal.SIGKILL)
            code = await replica.wait(30.0)
            fault.notes.append(f"exited with {code}")
            await asyncio.sleep(RESTART_AFTER_S)
            fault.notes.append(f"started again as pid {replica.start()}")
        elif kind.startswith("SIGTERM"):
            replica.signal(signal.SIGTERM)
            code = await replica.wait(60.0)
            fault.notes.append(f"exited with {code} after SIGTERM")
            if code is None:
                replica.signal(signal.SIGKILL)
                await replica.wait(30.0)
            fault.notes.append(f"started again as pid {replica.start()}")
        else:
            replica.signal(signal.SIGSTOP)
            await asyncio.sleep(FREEZE_S)
            replica.signal(signal.SIGCONT)
        replica.under_fault = False
        fault.end_s = time.monotonic() - origin
