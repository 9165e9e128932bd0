"""`/healthz`, `/readyz` and `/metrics` of a running service."""

from __future__ import annotations

import socket

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from sync_service.config import Settings
from tests.factories import user_event
from tests.integration.harness import create_topics, positions_reached, produce, running, wait_until


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_health_readiness_and_metrics(settings: Settings, engine: AsyncEngine) -> None:
    settings = settings.model_copy(update={"http_port": _free_port()})
    base = f"http://127.0.0.1:{settings.http_port}"
    await create_topics(settings)
    await produce(settings, settings.users_topic, [user_event(1, 1), (b"1", b"{")])
    async with running(settings), aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(f"{base}/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(ready, what="/readyz to answer 200")
        async with http.get(f"{base}/readyz") as response:
            body = await response.json()
        assert body == {
            "status": "ready",
            "checks": {
                "database": None,
                "schema": None,
                "kafka": None,
                "consumer": None,
                "dead_letter_guard": None,
            },
        }
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        await wait_until(lambda: positions_reached(engine, settings, 2), what="both records")
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 200
            metrics = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    # Records are counted as read; a rebalance may make the consumer read some twice.
    assert samples[("sync_events_consumed_total", (("topic", settings.users_topic),))] >= 2
    assert 'sync_changes_applied_total{entity="user"}' in metrics
    assert (
        f'sync_dead_letters_total{{kind="not_json",topic="{settings.users_topic}"}} 1.0' in metrics
    )
    assert "sync_batch_write_seconds_bucket" in metrics
