"""The lock files agree with pyproject.toml: every dependency's range is met by its pin
(an edit of pyproject.toml without `make lock` fails here), and the image's lock pins
the same versions as the one the tests run with."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text()
    assert "--hash=sha256:" in text, f"{name} is not hash-locked"
    return {canonicalize_name(n): v for n, v in PIN.findall(text)}


def declared(*groups: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for group in groups:
        found += [Requirement(r) for r in project["optional-dependencies"][group]]
    return found


@pytest.mark.parametrize(
    ("lock", "groups"), [("requirements.lock", ()), ("requirements-dev.lock", ("dev",))]
)
def test_every_declared_range_is_met_by_the_lock(lock: str, groups: tuple[str, ...]) -> None:
    pinned = pins(lock)
    unmet = []
    for requirement in declared(*groups):
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or version not in requirement.specifier:
            unmet.append(f"{requirement} (locked: {version or 'missing'})")
    assert unmet == [], "run `make lock`"


def test_the_image_runs_the_versions_the_tests_run_with() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime
