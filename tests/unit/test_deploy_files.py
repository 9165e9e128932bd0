"""The deploy files are checked against the schemas of what runs them, offline: every
Kubernetes manifest under deploy/k8s against Kubernetes' own API schemas (as shipped by
`kubernetes-validate`, strict: an unknown field is an error), and deploy/compose.yaml
against the Compose Specification's JSON Schema (as vendored by `check-jsonschema`).
Neither proves that a cluster or Docker accepts them; nothing here runs either."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUSTOMIZATION = "kustomization.yaml"
OLDEST_KUBERNETES = "1.31.0"
"""The oldest Kubernetes release the manifests are checked against, besides the newest
one the validator ships."""


def manifests() -> list[Path]:
    return sorted(p for p in (DEPLOY / "k8s").rglob("*.yaml") if p.name != KUSTOMIZATION)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubernetes_errors(path: Path) -> list[str]:
    """Every document of `path` against the strict schemas of both versions."""
    errors = []
    for version in (OLDEST_KUBERNETES, latest_version()):
        for document in documents(path):
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(map(str, error.path)) or "(top)"
                errors.append(f"{path.name} {document.get('kind')} @{version} {where}: "
                              f"{error.message}")  # fmt: skip
            except kubernetes_validate.SchemaNotFoundError as error:
                errors.append(f"{path.name}: {error.message}")
    return errors


def compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_kubernetes_manifest_matches_the_kubernetes_api_schema(path: Path) -> None:
    assert documents(path), f"{path} holds no resource"
    assert kubernetes_errors(path) == []


def test_every_manifest_is_in_a_kustomization() -> None:
    """`kubectl apply -k` applies only what a kustomization lists: a manifest left out
    would be checked here and never deployed."""
    listed = set()
    for kustomization in (DEPLOY / "k8s").rglob(KUSTOMIZATION):
        [document] = documents(kustomization)
        for resource in document.get("resources", []):
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization} lists {resource}, which does not exist"
            listed.add(target)
    assert set(manifests()) <= listed


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("replicas", "three", "spec.replicas: 'three' is not of type 'integer'"),
        ("replicass", 3, "('replicass' was unexpected)"),
    ],
)
def test_a_broken_manifest_is_caught(tmp_path: Path, field: str, value: Any, said: str) -> None:
    """The check can fail: a wrongly typed field, and a misspelt one (strict schemas)."""
    [workload] = [d for d in documents(DEPLOY / "k8s" / "consume.yaml") if d["kind"] != "Service"]
    workload["spec"][field] = value
    broken = tmp_path / "consume.yaml"
    broken.write_text(yaml.safe_dump(workload))
    errors = kubernetes_errors(broken)
    assert len(errors) == 2  # at both versions
    assert all(said in error for error in errors), errors


def test_the_compose_file_matches_the_compose_specification() -> None:
    checked = compose_check(DEPLOY / "compose.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok -- validation done" in checked.stdout


def test_a_broken_compose_file_is_caught(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = next(iter(compose["services"].values()))
    service["restart_policy"] = "always"  # not a Compose key (it is `restart`)
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(compose))
    checked = compose_check(broken)
    assert checked.returncode == 1
    assert "restart_policy" in checked.stdout
