"""The fast paths of the hot loop agree with the libraries they stand in for."""

from __future__ import annotations

import uuid

from email_validator import EmailNotValidError, validate_email
from hypothesis import given
from hypothesis import strategies as st

from sync_service.events.inbound import _email
from sync_service.events.outbound import (
    EVENT_ID_NAMESPACE,
    downstream_event_id,
    downstream_event_text,
)

_local = st.text(
    alphabet=st.sampled_from("abcxyzABC019.+-_!#$%&'*/=?^`{|}~\"()<>[]:;@\\ ,é"),
    min_size=0,
    max_size=70,
)
_domain = st.lists(
    st.text(alphabet=st.sampled_from("abcxyzABC019-_é"), min_size=0, max_size=12),
    min_size=1,
    max_size=4,
).map(".".join)
_tld = st.sampled_from(["com", "co", "c", "test", "local", "LOCALHOST", "x1", "", "onion"])


def _library_accepts(address: str) -> bool:
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def _we_accept(address: str) -> bool:
    try:
        _email(address)
    except ValueError:
        return False
    return True


@given(_local, _domain, _tld)
def test_email_check_agrees_with_email_validator(local: str, domain: str, tld: str) -> None:
    address = f"{local}@{domain}.{tld}" if tld else f"{local}@{domain}"
    assert _we_accept(address) == _library_accepts(address), address


@given(st.text(max_size=40))
def test_email_check_agrees_on_arbitrary_text(text: str) -> None:
    assert _we_accept(text) == _library_accepts(text)


@given(st.uuids())
def test_downstream_event_id_is_uuid5_of_the_inbound_id(inbound: uuid.UUID) -> None:
    expected = uuid.uuid5(EVENT_ID_NAMESPACE, str(inbound))
    assert downstream_event_id(inbound) == expected
    assert downstream_event_text(inbound) == str(expected)
