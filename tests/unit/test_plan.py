"""What `plan` does with one batch: stale changes change nothing, each entity's changes
apply in version order or wait as a whole, and no write breaks a source rule.
"""

from __future__ import annotations

from typing import Any

from sync_service.events.change import Change, Entity
from sync_service.pipeline.plan import COLUMNS, Applied, Plan, Row, Waiting, plan
from tests.factories import delete_event, order_event, user_event
from tests.unit.fakes import FakeTarget, decoded, pending_key

Stored = dict[Entity, dict[int, Row]]


def user(user_id: int, version: int, **overrides: Any) -> Change:
    return decoded(user_event(user_id, version, **overrides))


def order(order_id: int, user_id: int, version: int, **overrides: Any) -> Change:
    return decoded(order_event(order_id, user_id, version, **overrides))


def delete(entity: Entity, entity_id: int, version: int) -> Change:
    return decoded(delete_event(entity, entity_id, version))


def row(change: Change) -> Row:
    """The row an upsert leaves, as the table holds it."""
    assert change.row is not None
    return {**change.row, "version": change.version, "deleted_at": None}


def tombstone(previous: Row | None, change: Change) -> Row:
    """The row a delete leaves: the last known columns, the version and deleted_at."""
    base = previous if previous is not None else dict.fromkeys(COLUMNS[change.entity])
    return {**base, "id": change.id, "version": change.version, "deleted_at": change.occurred_at}


def stored(*rows: tuple[Entity, Row]) -> Stored:
    tables: Stored = {"user": {}, "order": {}}
    for entity, held in rows:
        tables[entity][held["id"]] = held
    return tables


def assert_nothing_written(result: Plan) -> None:
    assert (result.rows, result.applied) == ({"user": [], "order": []}, [])


def versions(result: Plan) -> list[tuple[Entity, int, int]]:
    return [pending_key(a.change) for a in result.applied]


# --- versions ------------------------------------------------------------------------------


def test_stale_and_duplicate_versions_change_nothing() -> None:
    held = row(user(7, 5))
    older, same = user(7, 3, name="Old"), user(7, 5, name="Again")
    result = plan([older, same], [], stored(("user", held)))
    assert_nothing_written(result)
    assert (result.stale, result.wait, result.unpend) == ([older, same], [], [])


def test_a_duplicate_within_the_batch_applies_once() -> None:
    first, copy = user(7, 2), user(7, 2)
    result = plan([first, copy], [], stored())
    assert result.applied == [Applied(first, row(first))]
    assert result.stale == [copy]


def test_several_versions_of_one_key_make_one_row_and_one_applied_per_version() -> None:
    v1, v2, v3 = user(7, 1, name="A"), user(7, 2, name="B"), delete("user", 7, 3)
    result = plan([v3, v1, v2], [], stored())  # arrival order does not matter
    after = [row(v1), row(v2), tombstone(row(v2), v3)]
    assert result.rows == {"user": [after[2]], "order": []}
    assert result.applied == [Applied(v1, after[0]), Applied(v2, after[1]), Applied(v3, after[2])]


def test_versions_above_the_stored_one_apply_on_top_of_it() -> None:
    held = row(user(7, 4, name="Held"))
    stale, newer = user(7, 4, name="Stale"), delete("user", 7, 6)
    result = plan([stale, newer], [], stored(("user", held)))
    assert result.applied == [Applied(newer, tombstone(held, newer))]
    assert result.stale == [stale]


# --- deletes -------------------------------------------------------------------------------


def test_a_delete_keeps_the_last_known_columns_and_sets_deleted_at() -> None:
    held = row(order(3, 7, 1, status="paid"))
    gone = delete("order", 3, 2)
    result = plan([gone], [], stored(("order", held), ("user", row(user(7, 1)))))
    expected = {**held, "version": 2, "deleted_at": gone.occurred_at}
    assert result.rows == {"user": [], "order": [expected]}
    assert result.applied == [Applied(gone, expected)]


def test_a_delete_of_an_unknown_id_makes_a_tombstone() -> None:
    gone = delete("user", 9, 4)
    result = plan([gone], [], stored())
    expected: Row = dict.fromkeys(COLUMNS["user"])
    expected.update(id=9, version=4, deleted_at=gone.occurred_at)
    assert result.rows == {"user": [expected], "order": []}


def test_an_upsert_after_a_delete_revives_the_row() -> None:
    held = tombstone(row(user(7, 1, name="Before")), delete("user", 7, 2))
    back = user(7, 3, name="After")
    result = plan([back], [], stored(("user", held)))
    assert result.rows == {"user": [row(back)], "order": []}
    assert result.rows["user"][0]["deleted_at"] is None


# --- an order's user ---------------------------------------------------------------------


def test_an_order_whose_user_has_no_row_waits() -> None:
    early = order(1, 7, 1)
    result = plan([early], [], stored())
    assert_nothing_written(result)
    assert result.wait == [Waiting(early, "user 7 has not arrived yet", 7)]


def test_an_order_applies_with_its_user_in_the_same_batch() -> None:
    early, owner = order(1, 7, 1), user(7, 1)
    result = plan([early, owner], [], stored())
    assert result.rows == {"user": [row(owner)], "order": [row(early)]}
    assert result.wait == []


def test_an_order_applies_when_its_user_is_stored_even_as_a_tombstone() -> None:
    for held in (row(user(7, 1)), tombstone(row(user(7, 1)), delete("user", 7, 2))):
        result = plan([order(1, 7, 1)], [], stored(("user", held)))
        assert versions(result) == [("order", 1, 1)]


def test_an_order_waits_while_its_new_user_waits() -> None:
    holder = row(user(1, 1, email="ada@example.com"))
    newcomer, its_order = user(7, 1, email="ada@example.com"), order(1, 7, 1)
    result = plan([newcomer, its_order], [], stored(("user", holder)))
    assert_nothing_written(result)
    assert [(w.change, w.blocked_by) for w in result.wait] == [(newcomer, 1), (its_order, 7)]


def test_an_order_deleted_before_its_user_arrives_never_refers_to_a_missing_user() -> None:
    target = FakeTarget()
    target.write([order(1, 7, 1), delete("order", 1, 2)])  # RuleBroken on a dangling user_id
    target.write([user(7, 1)])
    assert target.tables["order"][1]["version"] == 2
    assert target.pending == {}


def test_a_delete_of_a_stored_order_applies_without_loading_its_user() -> None:
    target = FakeTarget()
    target.write([user(7, 1), order(1, 7, 1)])
    target.write([delete("order", 1, 2)])  # the batch holds no user: none is loaded
    assert target.tables["order"][1]["deleted_at"] is not None
    assert target.pending == {}


# --- emails --------------------------------------------------------------------------------


def test_an_email_held_by_another_live_user_makes_the_newcomer_wait() -> None:
    holder = row(user(1, 1, email="ada@example.com"))
    newcomer = user(2, 1, email="ada@example.com")
    result = plan([newcomer], [], stored(("user", holder)))
    assert_nothing_written(result)
    assert result.wait == [Waiting(newcomer, "email ada@example.com is held by user 1", 1)]


def test_the_holder_keeps_its_email_when_both_change_in_one_batch() -> None:
    holder = row(user(1, 1, email="ada@example.com"))
    renamed = user(1, 2, email="ada@example.com", name="Ada L.")
    newcomer = user(2, 1, email="ada@example.com")
    result = plan([newcomer, renamed], [], stored(("user", holder)))
    assert result.rows == {"user": [row(renamed)], "order": []}
    assert [w.change for w in result.wait] == [newcomer]


def test_two_newcomers_for_one_free_email_both_wait() -> None:
    first, second = user(1, 1, email="ada@example.com"), user(2, 1, email="ada@example.com")
    result = plan([first, second], [], stored())
    assert_nothing_written(result)
    assert {(w.change.id, w.blocked_by) for w in result.wait} == {(1, 2), (2, 1)}


def test_a_deleted_user_frees_its_email() -> None:
    holder = row(user(1, 1, email="ada@example.com"))
    newcomer = user(2, 1, email="ada@example.com")
    result = plan([delete("user", 1, 2), newcomer], [], stored(("user", holder)))
    assert versions(result) == [("user", 1, 2), ("user", 2, 1)]
    assert result.wait == []
    # and once the tombstone is stored, it holds nothing
    held = tombstone(holder, delete("user", 1, 2))
    assert versions(plan([newcomer], [], stored(("user", held)))) == [("user", 2, 1)]


def test_a_user_that_moves_away_frees_its_email_in_the_same_batch() -> None:
    holder = row(user(1, 1, email="ada@example.com"))
    moved, newcomer = user(1, 2, email="lovelace@example.com"), user(2, 1, email="ada@example.com")
    result = plan([newcomer, moved], [], stored(("user", holder)))
    assert result.rows == {"user": [row(newcomer), row(moved)], "order": []}


def test_an_email_swap_between_two_users_in_one_batch_applies_both() -> None:
    a = row(user(1, 1, email="a@example.com"))
    b = row(user(2, 1, email="b@example.com"))
    a_to_b, b_to_a = user(1, 2, email="b@example.com"), user(2, 2, email="a@example.com")
    result = plan([a_to_b, b_to_a], [], stored(("user", a), ("user", b)))
    assert result.rows == {"user": [row(a_to_b), row(b_to_a)], "order": []}
    assert result.wait == []


def test_a_waiting_user_keeps_its_email_from_whoever_wants_it() -> None:
    # 2 wants 3's email, so 2 waits and keeps its own, which 1 wants: 1 waits too.
    a, b, c = (row(user(i, 1, email=f"{i}@example.com")) for i in (1, 2, 3))
    a_to_2, b_to_3 = user(1, 2, email="2@example.com"), user(2, 2, email="3@example.com")
    result = plan([a_to_2, b_to_3], [], stored(("user", a), ("user", b), ("user", c)))
    assert_nothing_written(result)
    assert {(w.change.id, w.blocked_by) for w in result.wait} == {(1, 2), (2, 3)}


# --- changes that wait -------------------------------------------------------------------


def test_a_chain_waits_as_a_whole() -> None:
    v1, v2 = order(1, 7, 1), order(1, 7, 2, status="paid")
    result = plan([v2, v1], [], stored())
    assert_nothing_written(result)
    assert [w.change for w in result.wait] == [v1, v2]


def test_a_chain_is_judged_by_its_final_state() -> None:
    # 2 wants 1's email at v1, but by v2 it has moved on to a free one.
    holder = row(user(1, 1, email="ada@example.com"))
    v1, v2 = user(2, 1, email="ada@example.com"), user(2, 2, email="grace@example.com")
    result = plan([v1, v2], [], stored(("user", holder)))
    assert result.applied == [Applied(v1, row(v1)), Applied(v2, row(v2))]


def test_a_later_version_waits_behind_a_pending_one() -> None:
    v1, v2 = order(1, 7, 1), order(1, 7, 2)
    result = plan([v2], [v1], stored())
    assert_nothing_written(result)
    assert [w.change for w in result.wait] == [v2]  # v1 is pending already
    assert result.unpend == []


def test_a_waiting_change_already_pending_is_not_inserted_again() -> None:
    result = plan([], [order(1, 7, 1)], stored())
    assert (result.wait, result.unpend, result.applied) == ([], [], [])


def test_pending_changes_apply_with_the_user_they_waited_for() -> None:
    v1, v2, owner = order(1, 7, 1), order(1, 7, 2), user(7, 1)
    result = plan([owner], [v1, v2], stored())
    assert versions(result) == [("user", 7, 1), ("order", 1, 1), ("order", 1, 2)]
    assert result.unpend == [("order", 1, 1), ("order", 1, 2)]
    assert result.rows["order"] == [row(v2)]


def test_pending_changes_that_became_stale_are_unpended() -> None:
    result = plan([], [order(1, 7, 1)], stored(("order", row(order(1, 7, 2)))))
    assert_nothing_written(result)
    assert result.unpend == [("order", 1, 1)]
    assert [c.version for c in result.stale] == [1]


def test_a_redelivered_copy_of_a_pending_change_keeps_it_pending() -> None:
    # A replay delivers the waiting order again (same event) before its user arrives.
    target = FakeTarget()
    early = order_event(1, 7, 1)
    target.write([decoded(early, offset=0)])
    target.write([decoded(early, offset=0)])
    assert set(target.pending) == {("order", 1, 1)}
    target.write([user(7, 1)])
    assert [pending_key(c) for c, _ in target.outbox] == [("user", 7, 1), ("order", 1, 1)]


def test_every_waiting_version_applies_when_they_waited_for_different_users() -> None:
    # Source: 2 and 4 take two@ and four@; 2 moves away, 3 takes two@; 4 is deleted,
    # 3 moves to four@. User 3's partition is read first, the others' later.
    target = FakeTarget()
    target.write([user(2, 1, email="two@example.com"), user(4, 1, email="four@example.com")])
    target.write([user(3, 2, email="two@example.com")])  # waits for user 2
    target.write([user(3, 5, email="four@example.com")])  # waits (behind v2) for user 4
    target.write([delete("user", 4, 3)])
    target.write([user(2, 4, email="elsewhere@example.com")], sweep=True)
    assert target.pending == {}
    assert target.tables["user"][3]["email"] == "four@example.com"
    outbox = [pending_key(c) for c, _ in target.outbox]
    assert [v for entity, i, v in outbox if (entity, i) == ("user", 3)] == [2, 5]


# --- snapshot reads (Debezium's op r) ---------------------------------------------------


def read(change: Change) -> Change:
    """`change` as a snapshot read: the row as the source held it at its version."""
    return change._replace(snapshot=True)


def test_a_snapshot_read_of_the_row_as_stored_changes_nothing() -> None:
    held = row(user(7, 5))
    result = plan([read(user(7, 9))], [], stored(("user", held)))
    assert_nothing_written(result)
    assert [c.version for c in result.stale] == [9]


def test_a_snapshot_read_that_differs_applies_and_a_later_change_follows_it() -> None:
    held = row(user(7, 5))
    newer, after = read(user(7, 9, name="Ada")), user(7, 12, name="Ada L.")
    result = plan([after, newer], [], stored(("user", held)))
    assert versions(result) == [("user", 7, 9), ("user", 7, 12)]
    assert result.rows["user"] == [row(after)]


def test_a_snapshot_read_revives_a_deleted_row_and_reads_within_a_batch_compare_in_order() -> None:
    gone = tombstone(row(user(7, 5)), delete("user", 7, 6))
    same = user(7, 9)
    result = plan([read(same), read(user(7, 10))], [], stored(("user", gone)))
    assert versions(result) == [("user", 7, 9)]  # the second read equals the first
    assert result.rows["user"] == [row(same)]
