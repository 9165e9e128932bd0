"""Inbound change envelopes (CONTRACT section 1) as strict Pydantic schemas.

An envelope that validates is a change the target can store exactly: ids are positive
integers, money is an exact two-place decimal, every time carries a zone. The schemas
are typed dicts validated straight from the record's bytes (`validate_json`, strict):
every check but the email's and money's rounding runs in pydantic-core, and what comes
out is the dict that the pipeline keeps, with no model object built per record.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal, NotRequired
from uuid import UUID

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    with_config,
)
from typing_extensions import TypedDict

# The everyday shape of an address: dot-atoms on both sides, a dotted domain with a
# letter TLD. Every such address is valid for email-validator too (the special-use TLDs
# aside, checked below), so only the rest pays for the library's full parse.
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,63})"
)
_SPECIAL_TLDS = frozenset(SPECIAL_USE_DOMAIN_NAMES)


def _email(value: str) -> str:
    """A deliverable-looking address, kept exactly as the source wrote it."""
    plain = _PLAIN_EMAIL.fullmatch(value)
    if plain and len(value.partition("@")[0]) <= 64 and plain[1].lower() not in _SPECIAL_TLDS:
        return value
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as error:
        raise ValueError(f"not a valid email address: {error}") from None
    return value


Email = Annotated[
    str, Field(max_length=255, json_schema_extra={"format": "email"}), AfterValidator(_email)
]


def _no_nul(value: str) -> str:
    """PostgreSQL's text cannot hold U+0000: a row with it could never be written."""
    if "\x00" in value:
        raise ValueError("contains U+0000 (a NUL character), which a text column cannot store")
    return value


Name = Annotated[str, Field(strict=True, min_length=1, max_length=255), AfterValidator(_no_nul)]
Timestamp = Annotated[AwareDatetime, Field(strict=True)]
"""Strict: only an RFC 3339 string with a zone (a bare number would be epoch seconds)."""
EntityId = Annotated[int, Field(strict=True, gt=0, le=2**63 - 1)]
Version = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]
_CENT = Decimal("0.01")


def _two_places(value: Decimal) -> Decimal:
    """12.5 becomes 12.50, as numeric(14,2) stores it and the outbox shows it."""
    return value.quantize(_CENT)


Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=2, allow_inf_nan=False),
    AfterValidator(_two_places),
]
"""A string or a JSON number. pydantic-core reads a number through a float, which is
exact only up to 15 digits: `decode` reads a longer literal again as a decimal."""
MONEY: TypeAdapter[Decimal] = TypeAdapter(Money)

Country = Annotated[
    Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None,
    Field(json_schema_extra={"default": None}),  # `decode` reads an absent one as null
]
_SCHEMA = ConfigDict(extra="ignore")


@with_config(_SCHEMA)
class UserData(TypedDict):
    """A user row as the source holds it."""

    id: EntityId
    email: Email
    name: Name
    active: StrictBool
    country: NotRequired[Country]
    created_at: Timestamp
    updated_at: Timestamp


@with_config(_SCHEMA)
class OrderData(TypedDict):
    """An order row as the source holds it."""

    id: EntityId
    user_id: EntityId
    total: Money
    currency: Annotated[str, Field(strict=True, pattern=r"^[A-Z]{3}$")]
    status: Literal["pending", "paid", "shipped", "cancelled", "refunded"]
    created_at: Timestamp
    updated_at: Timestamp


@with_config(_SCHEMA)
class DeletedKey(TypedDict):
    """What a delete must carry: the id."""

    id: EntityId


@with_config(_SCHEMA)
class UserUpsert(TypedDict):
    event_id: UUID
    version: Version
    occurred_at: Timestamp
    entity: Literal["user"]
    op: Literal["upsert"]
    data: UserData


@with_config(_SCHEMA)
class UserDelete(TypedDict):
    event_id: UUID
    version: Version
    occurred_at: Timestamp
    entity: Literal["user"]
    op: Literal["delete"]
    data: DeletedKey


@with_config(_SCHEMA)
class OrderUpsert(TypedDict):
    event_id: UUID
    version: Version
    occurred_at: Timestamp
    entity: Literal["order"]
    op: Literal["upsert"]
    data: OrderData


@with_config(_SCHEMA)
class OrderDelete(TypedDict):
    event_id: UUID
    version: Version
    occurred_at: Timestamp
    entity: Literal["order"]
    op: Literal["delete"]
    data: DeletedKey


UserEnvelope = Annotated[UserUpsert | UserDelete, Field(discriminator="op")]
OrderEnvelope = Annotated[OrderUpsert | OrderDelete, Field(discriminator="op")]
Envelope = UserUpsert | UserDelete | OrderUpsert | OrderDelete

USER_ENVELOPE: TypeAdapter[UserUpsert | UserDelete] = TypeAdapter(UserEnvelope)
ORDER_ENVELOPE: TypeAdapter[OrderUpsert | OrderDelete] = TypeAdapter(OrderEnvelope)
