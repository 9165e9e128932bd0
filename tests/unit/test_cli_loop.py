"""Every command runs its work on uvloop's event loop, and hands back what it returns."""

from __future__ import annotations

import asyncio

from sync_service.cli import _run


def test_a_command_runs_on_uvloop() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert _run(loop_module()).startswith("uvloop")
