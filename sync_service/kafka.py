"""Kafka helpers shared by the consumer, the relay and the operators' commands."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from sync_service.config import Settings
from sync_service.connections import kafka as connections
from sync_service.errors import UserError


@contextlib.contextmanager
def quiet_connect_errors() -> Iterator[None]:
    """aiokafka logs each refused connection at ERROR; the caller reports the failure
    itself, as one line, so those logs would only repeat it."""
    library = logging.getLogger("aiokafka")
    level = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(level)


def unreachable(settings: Settings, error: BaseException) -> UserError:
    """The one line for a client that could not start: why, when the broker refused it."""
    if isinstance(error, connections.KafkaRefused):
        return UserError(str(error.args[0]))
    return UserError(
        f"cannot reach Kafka at {settings.kafka_bootstrap} ({type(error).__name__}): "
        "is it running? (scripts/services up; SYNC_KAFKA_BOOTSTRAP)"
    )


async def admin(settings: Settings, timeout_ms: int = 10_000) -> AIOKafkaAdminClient:
    """A started admin client, or a `UserError` when the broker does not answer."""
    client = connections.admin(settings, request_timeout_ms=timeout_ms)
    try:
        with quiet_connect_errors():
            await connections.start(client, settings)
    except (KafkaConnectionError, KafkaError, OSError) as error:
        await client.close()
        raise unreachable(settings, error) from None
    return client


async def require_topics(
    settings: Settings,
    topics: Iterable[str],
    hint: str = "create them (upstream owns them), or check SYNC_*_TOPIC",
) -> dict[str, int]:
    """The partition count of each topic; a `UserError` names any that does not exist."""
    client = await admin(settings)
    try:
        wanted = sorted(set(topics))
        described = await client.describe_topics(wanted)
    finally:
        await client.close()
    counts = {}
    missing = []
    for topic in described:
        if topic.get("error_code", 0) != 0 or not topic.get("partitions"):
            missing.append(topic["topic"])
        else:
            counts[topic["topic"]] = len(topic["partitions"])
    if missing:
        raise UserError(
            f"topic(s) {', '.join(sorted(missing))} do not exist on "
            f"{settings.kafka_bootstrap}: {hint}"
        )
    return counts


async def ensure_topics(
    settings: Settings, partitions: dict[str, int], configs: dict[str, dict[str, str]] | None = None
) -> None:
    """Create the topics that do not exist yet (for the demo, the tests and the relay)."""
    client = await admin(settings)
    try:
        existing = set(await client.list_topics())
        new = [
            NewTopic(t, n, 1, topic_configs=(configs or {}).get(t, {}))
            for t, n in partitions.items()
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await client.create_topics(new)
    finally:
        await client.close()
