"""Names that cross packages live once: the label, annotation, finalizer, Secret-key and
ServiceAccount names in ``api/labels.py``, the DAG's task names in ``pipelines/names.py``.

The check walks every module of the project's packages (those of ``[tool.importlinter]``) and
fails on a string literal equal to one of those names anywhere else, or on a task name inside an
Argo expression (``{{tasks.NAME.outputs...}}``, ``NAME.Succeeded``). Docstrings and comments are
prose and not checked.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from api import labels
from pipelines import names

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
HOMES = {ROOT / "api" / "labels.py", ROOT / "pipelines" / "names.py"}
# Task names matter only where the DAG is known: steps know nothing of it (an init container or an
# output may be called "pull-adapters" or "smoke-test" there), and pipelines/templates.py names
# its WorkflowTemplates after the steps (kaiflow-fetch-dataset), which is not a DAG task name.
NO_DAG = ("steps", "stepkit", "serving_bento", "presets", "api")
STEP_NAMED = {ROOT / "pipelines" / "templates.py"}
KINDS = ("LABEL_", "ANNOTATION_", "FINALIZER", "KAIFLOW_PREFIX", "CONTROLLER_COMPONENT")
LABEL_NAMES = {value: name for name, value in vars(labels).items()
               if isinstance(value, str) and (name.startswith(KINDS) or name.endswith(("_SECRET_KEY", "_SERVICE_ACCOUNT")))}
TASK_NAMES = {value: name for name, value in vars(names).items() if name.startswith("TASK_") and isinstance(value, str)}
TASK_REFERENCE = re.compile(r"tasks\.([A-Za-z0-9-]+)\.|\b([a-z0-9-]+)\.(?:Succeeded|Failed|Errored|Skipped|Omitted|Daemoned)\b")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def literals_elsewhere(path: Path, tasks: bool = True) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        value = node.value
        if value in LABEL_NAMES:
            found.append(f"{where}:{node.lineno}: {value!r} is api.labels.{LABEL_NAMES[value]}")
        elif tasks and "-" in value and value in TASK_NAMES:
            found.append(f"{where}:{node.lineno}: {value!r} is pipelines.names.{TASK_NAMES[value]}")
        for match in TASK_REFERENCE.finditer(value) if tasks else ():
            task = match.group(1) or match.group(2)
            if task in TASK_NAMES:
                found.append(f"{where}:{node.lineno}: task {task!r} in {value!r} "
                             f"is pipelines.names.{TASK_NAMES[task]}")
    return found


def test_cross_package_names_are_written_once():
    found = []
    checked = 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path not in HOMES:
                checked += 1
                found += literals_elsewhere(path, tasks=package not in NO_DAG and path not in STEP_NAMED)
    assert checked > 80  # the walk found the modules
    assert not found, "\n".join(found)


def test_a_planted_literal_is_found(tmp_path: Path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Docstrings may say kaito.sh/workspace."""\n'
                       'SELECTOR = {"kaito.sh/workspace": "x"}\n'
                       'DEPENDS = "deploy-inference.Succeeded"\n'
                       'URL = "{{tasks.deploy-inference.outputs.parameters.service-url}}"\n'
                       'ACCOUNT = "kaiflow-workflow"\n')
    found = literals_elsewhere(planted)
    assert sorted(line.split(":")[1] for line in found) == ["2", "3", "4", "5"]
