"""`/healthz` (the process answers), `/readyz` (database reachable with the schema at
head, no Kafka refusal, and a consumer that owns partitions or a relay that runs) and
`/metrics`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadinessCheck = Callable[[], Awaitable[dict[str, str | None]]]
"""Returns each check's failure (None where it passed)."""


def make_app(readiness: ReadinessCheck) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            failures = await asyncio.wait_for(readiness(), timeout=5)
        except TimeoutError:
            failures = {"readiness": "checks did not answer within 5s"}
        failed = {name: why for name, why in failures.items() if why is not None}
        body = {"status": "not ready" if failed else "ready", "checks": failures}
        return web.json_response(body, status=503 if failed else 200)

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_http(port: int, readiness: ReadinessCheck) -> web.AppRunner:
    """Start the health and metrics endpoints on `port` (all interfaces)."""
    runner = web.AppRunner(make_app(readiness), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host="0.0.0.0", port=port).start()
    return runner
