"""The Quix Streams peer's own virtualenv, made on first use and kept under `.services/`
(this checkout's own: `.cache/` may be shared between checkouts).

Invariant: quixstreams and what it brings (confluent-kafka, psycopg2) live only there,
never in the service's dependencies or its `.venv`; a virtualenv counts as made only once
its marker records exactly `REQUIREMENT`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Final

from bench.progress import say

REQUIREMENT: Final = "quixstreams[postgresql]==3.28.1"


class QuixUnavailable(RuntimeError):
    """The virtualenv could not be made; the message names the log."""


def folder(repo: Path) -> Path:
    return repo / ".services" / "bench-quix" / "venv"


def python(repo: Path) -> Path:
    """The virtualenv's interpreter, made with `REQUIREMENT` unless it already is."""
    venv = folder(repo)
    marker = venv / ".requirement"
    interpreter = venv / "bin" / "python"
    if marker.exists() and marker.read_text() == REQUIREMENT and interpreter.exists():
        return interpreter
    say(f"quix: making {venv} with {REQUIREMENT}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "pip.log"
    with log.open("wb") as out:
        for command in (
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(interpreter), "-m", "pip", "install", "--quiet", REQUIREMENT],
        ):
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise QuixUnavailable(
                    f"making the Quix Streams virtualenv failed (exit {done.returncode}): see {log}"
                )
    marker.write_text(REQUIREMENT)
    return interpreter
