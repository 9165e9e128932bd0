"""Logging: one line per event on stderr, `key=value` context; tracebacks only at DEBUG
or for errors the service cannot handle."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO") -> None:
    """Route the service's and the libraries' logs to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every connection hiccup at ERROR; the service reports those itself.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
