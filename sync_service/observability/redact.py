"""Secrets never leave the process: every known secret value (the database password, the
Kafka SASL password, any `*password*`/`*secret*`/`*token*` setting) is replaced by `***`
in every log record, error line and traceback that this module sees, and URLs are shown
with their password masked.

`register` is called with the settings' secrets before anything is logged; `redact` and
`RedactSecrets` are the last line of defence, `masked_url` the first (nothing should try
to print a secret in the first place).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from pydantic import SecretBytes, SecretStr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from pydantic import BaseModel

MASK = "***"
_SECRET_NAME = re.compile(r"password|secret|token|passphrase", re.IGNORECASE)
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register(values: Iterable[str | None]) -> None:
    """Redact these values (and their URL-encoded forms) from now on."""
    global _pattern
    added = False
    for value in values:
        if not value:
            continue
        for form in {value, quote(value, safe=""), quote_plus(value)}:
            if form not in _secrets:
                _secrets.add(form)
                added = True
    if added:  # the longest first, so that no shorter secret leaves a tail of a longer one
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(map(re.escape, ordered)))


def redact(text: str) -> str:
    """`text` with every registered secret replaced by `***`."""
    if _pattern is None:
        return text
    return _pattern.sub(MASK, text)


def masked_url(url: str) -> str:
    """A database URL fit to print: the password (if any) masked; a URL that does not
    parse is not printed at all (it might be all secret)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<a database URL that does not parse>"


def url_password(url: str) -> str | None:
    """The password in a database URL (None when there is none or it does not parse)."""
    try:
        return make_url(url).password
    except (ArgumentError, ValueError):
        return None


def is_secret_field(name: str) -> bool:
    """Whether a setting called `name` holds a secret by its name alone."""
    return bool(_SECRET_NAME.search(name))


def secrets_of(settings: BaseModel) -> list[str]:
    """The secret values in `settings`: a database URL's password, every `SecretStr`,
    and every string setting whose name says it is a secret."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, SecretBytes):
            found.append(value.get_secret_value().decode(errors="replace"))
        elif isinstance(value, str) and name.endswith("_url"):
            found.append(url_password(value) or "")
        elif isinstance(value, str) and is_secret_field(name):
            found.append(value)
    return [value for value in found if value]


def shown(name: str, value: Any) -> Any:
    """`value` of the setting `name` as it may be printed."""
    if isinstance(value, str) and name.endswith("_url"):
        return masked_url(value)
    if isinstance(value, str) and value and is_secret_field(name):
        return MASK
    return value


_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class RedactSecrets(logging.Filter):
    """Rewrites each record so that no registered secret is in its message, arguments,
    exception text or extra fields (the formatter redacts the rendered line again)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pattern is None:
            return True
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in record.__dict__.items():
            if key in _STANDARD or isinstance(value, int | float | bool) or value is None:
                continue
            text = value if isinstance(value, str) else str(value)
            if redact(text) != text:
                record.__dict__[key] = redact(text)
        return True
