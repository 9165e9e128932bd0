"""Every valid source history, delivered in any way Kafka may deliver it, ends at the
source's state, with one downstream event per source change and no rule ever broken.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from hypothesis import HealthCheck, event, given, settings, target

from sync_service.events.change import Change
from tests.histories import Scenario, scenarios
from tests.unit.fakes import FakeTarget, pending_key


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_any_delivery_of_a_valid_history_ends_at_the_source_state(scenario: Scenario) -> None:
    db = FakeTarget()
    decoded: dict[tuple[str, int, int], Change] = {}
    waits: Counter[str] = Counter()
    for batch in scenario.batches:
        changes = [
            decoded.setdefault((r.topic, r.partition, r.offset), r.decoded()) for r in batch.records
        ]
        result = db.write(changes, sweep=batch.sweep)  # checks the rules after each batch
        waits.update(waiting.reason.split()[0] for waiting in result.wait)
    for reason in waits:
        event(f"a change waited for its {reason}")
    # Steer generation towards the rarer, harder histories: emails that are not yet free.
    target(float(waits["email"]), label="changes that waited for an email")

    history = scenario.history
    assert db.tables == history.final
    assert db.pending == {}

    applied = [pending_key(change) for change, _row in db.outbox]
    assert len(applied) == len(set(applied)), "a change was applied twice"
    assert set(applied) == set(history.by_version)
    per_aggregate: dict[tuple[str, int], list[int]] = defaultdict(list)
    for entity, entity_id, version in applied:
        per_aggregate[(entity, entity_id)].append(version)
    assert all(v == sorted(set(v)) for v in per_aggregate.values()), "out of version order"
    for change, row in db.outbox:
        source = history.by_version[pending_key(change)]
        assert (change.event_id, row) == (source.event_id, source.after)
