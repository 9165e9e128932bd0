"""Progress lines for the person watching a run; the results go to stdout and the file."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One line on stderr, at once."""
    print(message, file=sys.stderr, flush=True)
