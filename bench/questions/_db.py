"""What every question shares about the server: a scratch database of its own, the
machine and versions it ran on, and one plain round trip for scale."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import time
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.progress import say
from bench.report import git_version
from sync_service.errors import UserError
from sync_service.retry import describe

SELECT_ONE: Final = select(1)


def machine() -> dict[str, Any]:
    """CPU model, cores and memory as /proc states them."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cores = {line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("cpu cores")}
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    memory_kib = int(meminfo["MemTotal"].split()[0])
    return {
        "cpu_model": models[0] if models else platform.processor() or "unknown",
        "logical_cpus": len(models) or os.cpu_count(),
        "cores_per_socket": int(cores.pop()) if len(cores) == 1 else None,
        "memory_gib": round(memory_kib / 1024**2, 1),
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


async def versions(url: str) -> dict[str, Any]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            server = await connection.scalar(text("SHOW server_version"))
    finally:
        await engine.dispose()
    found: dict[str, Any] = {"python": platform.python_version(), "postgresql": server}
    for package in ("sqlalchemy", "asyncpg", "alembic"):
        found[package] = metadata.version(package)
    found["git"] = git_version()
    return found


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A new database on `server_url`'s server, dropped (with its connections) on exit."""
    name = f"questions_{secrets.token_hex(4)}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {quoted}"))
    except OSError as error:
        await admin.dispose()
        shown = make_url(server_url).render_as_string()
        raise UserError(f"cannot reach PostgreSQL at {shown}: {error}") from None
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            async with admin.connect() as connection:
                await connection.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        except (OSError, sa_exc.DBAPIError) as error:  # the run's own error matters more
            say(f"could not drop database {name} ({describe(error)}): drop it by hand")
        await admin.dispose()


async def select_one_times(url: str, count: int) -> list[float]:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    times = []
    try:
        for _ in range(count + 1):
            started = time.perf_counter()
            await connection.fetchval("SELECT 1")
            times.append(time.perf_counter() - started)
    finally:
        await connection.close()
    return times[1:]
