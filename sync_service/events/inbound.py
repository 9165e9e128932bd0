"""Inbound change envelopes (CONTRACT section 1) as strict Pydantic models.

A model that validates is a change the target can store exactly: ids are positive
integers, money is an exact two-place decimal, every time carries a zone.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
)


def _rfc3339_text(value: Any) -> Any:
    """Only a string may become a time: a bare number would be read as epoch seconds."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 string with a zone, e.g. 2026-11-24T10:00:00Z")
    return value


def _money_text(value: Any) -> Any:
    """Money arrives as a string or a number that was parsed exactly (never a float)."""
    if isinstance(value, bool | float):
        raise ValueError("must be a decimal string or an exact JSON number")
    return value


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
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]
EntityId = Annotated[StrictInt, Field(gt=0, le=2**63 - 1)]
Version = Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]
_CENT = Decimal("0.01")


def _two_places(value: Decimal) -> Decimal:
    """12.5 becomes 12.50, as numeric(14,2) stores it and the outbox shows it."""
    return value.quantize(_CENT)


Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=2, allow_inf_nan=False),
    BeforeValidator(_money_text),  # after Field, so that the JSON Schema keeps `minimum`
    AfterValidator(_two_places),
]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=False)


class UserData(_Strict):
    """A user row as the source holds it."""

    id: EntityId
    email: Email
    name: Annotated[str, Field(min_length=1, max_length=255)]
    active: StrictBool
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    created_at: Timestamp
    updated_at: Timestamp


class OrderData(_Strict):
    """An order row as the source holds it."""

    id: EntityId
    user_id: EntityId
    total: Money
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    status: Literal["pending", "paid", "shipped", "cancelled", "refunded"]
    created_at: Timestamp
    updated_at: Timestamp


class DeletedKey(_Strict):
    """What a delete must carry: the id."""

    id: EntityId


class _Envelope(_Strict):
    event_id: UUID
    version: Version
    occurred_at: Timestamp


class UserUpsert(_Envelope):
    entity: Literal["user"]
    op: Literal["upsert"]
    data: UserData


class UserDelete(_Envelope):
    entity: Literal["user"]
    op: Literal["delete"]
    data: DeletedKey


class OrderUpsert(_Envelope):
    entity: Literal["order"]
    op: Literal["upsert"]
    data: OrderData


class OrderDelete(_Envelope):
    entity: Literal["order"]
    op: Literal["delete"]
    data: DeletedKey


UserEnvelope = Annotated[UserUpsert | UserDelete, Field(discriminator="op")]
OrderEnvelope = Annotated[OrderUpsert | OrderDelete, Field(discriminator="op")]
Envelope = UserUpsert | UserDelete | OrderUpsert | OrderDelete

USER_ENVELOPE: TypeAdapter[UserUpsert | UserDelete] = TypeAdapter(UserEnvelope)
ORDER_ENVELOPE: TypeAdapter[OrderUpsert | OrderDelete] = TypeAdapter(OrderEnvelope)
