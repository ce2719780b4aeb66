"""Argo's own validation (``argo lint --offline``, stricter than its JSON schema) of every rendered
example and every file in workflow_templates/, with the argo CLI the cluster box builds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from api import load_workspace
from pipelines import manifest
from tests.fixtures.cluster import cluster_tools

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TEMPLATES = sorted((ROOT / "workflow_templates").glob("*.yaml"))


@pytest.fixture(scope="module")
def argo() -> Path:
    return cluster_tools() / "argo"


def lint(argo: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(argo), "lint", "--offline", "--output", "simple", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_every_rendered_example_passes_argo_lint(argo, example, tmp_path):
    rendered = tmp_path / f"{example.stem}.yaml"
    rendered.write_text(yaml.safe_dump(manifest(load_workspace(example)), sort_keys=False))
    done = lint(argo, rendered)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_every_workflow_template_passes_argo_lint(argo, template):
    done = lint(argo, template)
    assert done.returncode == 0, done.stdout + done.stderr


def test_argo_lint_refuses_a_broken_workflow(argo, tmp_path):
    """The check itself works: a DAG task naming a template that does not exist is refused."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"generateName": "x-"},
        "spec": {"entrypoint": "main", "templates": [{"name": "main", "dag": {"tasks": [{"name": "a", "template": "nope"}]}}]}}))
    done = lint(argo, broken)
    assert done.returncode != 0 and "nope" in done.stdout + done.stderr
