"""`sync-service dlq show`: one dead letter, whole, safe to print on a terminal.

Keys, header values and values are any bytes. Text that is UTF-8 without control
characters is shown as it is; anything else as a hex dump (an escape sequence in a
message must never reach the operator's terminal). The JSON form carries every byte
string as base64 too, so a script gets the stored bytes exactly.
"""

from __future__ import annotations

import unicodedata
from base64 import b64decode, b64encode
from typing import Any

from sync_service.ops.dlq import DeadLetterView

_ALLOWED_CONTROLS = frozenset("\n\t")
_HEX_ROW = 16


def printable(value: bytes) -> str | None:
    """`value` as text, or None if it is not UTF-8 text without control characters."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for char in text:
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) in ("Cc", "Cs"):
            return None
    return text


def hexdump(value: bytes) -> list[str]:
    """`xxd`-like rows: offset, 16 bytes in hex, and their printable ASCII."""
    rows = []
    for start in range(0, len(value), _HEX_ROW):
        piece = value[start : start + _HEX_ROW]
        hexes = " ".join(f"{b:02x}" for b in piece)
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in piece)
        rows.append(f"{start:08x}  {hexes:<{_HEX_ROW * 3 - 1}}  |{ascii_}|")
    return rows


def _inline(value: bytes | None) -> str:
    """A key or header value on one line."""
    if value is None:
        return "(none)"
    text = printable(value)
    if text is not None and "\n" not in text and "\t" not in text:
        return repr(text)
    return f"(binary, {len(value)} bytes) {value.hex()}"


def escaped(text: str) -> str:
    """`text` on one line, its control characters as `\\xNN` escapes."""
    return "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cs") else c for c in text
    )


def _header_pairs(letter: DeadLetterView) -> list[tuple[str, bytes | None]]:
    return [
        (str(name), None if value is None else b64decode(value))
        for name, value in letter.headers or []
    ]


def render_letter(letter: DeadLetterView) -> str:
    """Every stored field, labelled; the value last, whole."""
    lines = [
        f"dead letter #{letter.id}",
        f"origin:    {letter.topic}[{letter.partition}]@{letter.offset}  (topic[partition]@offset)",
        f"kind:      {letter.kind}",
        f"reason:    {escaped(letter.reason)}",
        f"stored:    {letter.created_at.isoformat()}",
        f"key:       {_inline(letter.key)}",
    ]
    pairs = _header_pairs(letter)
    if not pairs:
        lines.append("headers:   (none)")
    for index, (name, value) in enumerate(pairs):
        label = "headers:" if index == 0 else ""
        lines.append(f"{label:<10} {_inline(name.encode())}: {_inline(value)}")
    if letter.redriven_at is not None:
        lines.append(f"re-driven: {letter.redriven_at.isoformat()} ({letter.redrive_result})")
    elif letter.redrive_result is not None:
        lines.append(f"last re-drive: {escaped(letter.redrive_result)}")
    value = letter.value
    kept = len(value or b"")
    if value is None:
        lines.append("value:     (none)")
        return "\n".join(lines)
    size = f"{letter.value_size} bytes" + (
        "" if kept == letter.value_size else f", the first {kept} kept"
    )
    text = printable(value)
    if text is not None:
        lines.append(f"value:     {size}, UTF-8 text:")
        lines.append(text)
    else:
        lines.append(f"value:     {size}, binary (hex):")
        lines.extend(hexdump(value))
    return "\n".join(lines)


def _bytes_json(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"text": printable(value), "base64": b64encode(value).decode(), "size": len(value)}


def letter_json(letter: DeadLetterView) -> dict[str, Any]:
    """Every stored field; byte strings as `{"text": str or null, "base64", "size"}`."""
    return {
        "id": letter.id,
        "origin": {"topic": letter.topic, "partition": letter.partition, "offset": letter.offset},
        "kind": letter.kind,
        "reason": letter.reason,
        "created_at": letter.created_at.isoformat(),
        "key": _bytes_json(letter.key),
        "headers": [{"name": n, "value": _bytes_json(v)} for n, v in _header_pairs(letter)],
        "value": _bytes_json(letter.value),
        "value_size": letter.value_size,
        "redriven_at": letter.redriven_at.isoformat() if letter.redriven_at else None,
        "redrive_result": letter.redrive_result,
    }
