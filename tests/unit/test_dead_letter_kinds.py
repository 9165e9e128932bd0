"""contracts/README.md's table of dead-letter kinds and the code's kinds are the same, and
a message of each kind gets it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from bench.hostile import corpus
from sync_service.events.change import DeadLetter, DeadLetterKind
from sync_service.pipeline.decode import Limits, decode
from tests.factories import encode, order_event, user_event

CONTRACT = Path(__file__).parents[2] / "contracts" / "README.md"
LIMITS = Limits(
    max_bytes=1_048_576, max_depth=8, dead_letter_value_bytes=65_536, dead_letter_key_bytes=1024
)


DEBEZIUM_ONLY = {"unsupported_op", "unsupported_source"}
"""Kinds only the Debezium decoder gives, in the contract's table of that input."""


def documented_kinds() -> list[str]:
    """The first cell of each row of the table under `### Dead-letter kinds`."""
    text = CONTRACT.read_text()
    section = text.split("### Dead-letter kinds", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_the_contract_lists_exactly_the_kinds_the_code_gives() -> None:
    documented = documented_kinds()
    assert len(documented) == len(set(documented)), documented
    assert set(documented) == set(get_args(DeadLetterKind)) - DEBEZIUM_ONLY
    debezium = CONTRACT.read_text().split("### Dead letters of the Debezium input", 1)[1]
    assert all(f"| `{kind}` |" in debezium for kind in DEBEZIUM_ONLY)


def test_the_dead_letters_column_table_points_at_the_kinds() -> None:
    assert "| `kind` | what is wrong, one of the kinds below (" in CONTRACT.read_text()


def test_a_message_of_each_kind_gets_it() -> None:
    samples: dict[str, tuple[bytes | None, bytes | None]] = {
        message.kind: (message.key, message.value) for message in corpus()
    }
    samples["wrong_entity"] = (b"7", encode(order_event(7, 3, 1)))
    samples["invalid"] = (b"7", encode(user_event(7, 1, email="not-an-address")))
    got = {}
    for kind, (key, value) in samples.items():
        result = decode(
            entity="user", topic="cdc.users", partition=0, offset=0, key=key, value=value,
            limits=LIMITS,
        )  # fmt: skip
        assert isinstance(result, DeadLetter), kind
        got[kind] = result.kind
    assert got == {kind: kind for kind in documented_kinds()}
