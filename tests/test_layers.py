"""Checks that keep the layers (issue 9): import arrows, declared dependencies, light imports.

* The import arrows of DEVELOPERS.md are import-linter contracts in pyproject.toml
  (``[tool.importlinter]``): one ``layers`` contract, the controller's one way into ``steps/``, the
  steps' independence. ``lint-imports`` must keep them all, a planted violation must break each
  (so the contracts are not vacuous), and the independence contract names every step.
* No module imports a private name (``_x``) from another top-level package.
* Every third-party package a module imports directly (walking the AST of every module, imports
  inside functions included) is declared in pyproject.toml, in the dependencies or an extra.
* The light entry points (``kaiflow validate``/``render``, the runner) import no ML stack.
"""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["importlinter"]["root_packages"]
# our own top-level names, also those that are not installed packages
OURS = set(PACKAGES) | {"tests", "bench", "examples"}
HEAVY = {"torch", "transformers", "peft", "trl", "bitsandbytes", "bentoml", "kubernetes", "azure", "datasets"}
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def _lint(root: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_import_arrows_are_kept():
    result = _lint(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(PYPROJECT['tool']['importlinter']['contracts'])} kept, 0 broken." in result.stdout


PLANTS = [
    # (module, planted import, broken contract, the chain reported)
    ("stepkit/common.py", "from pipelines import render", "layers:", "stepkit.common -> pipelines"),
    ("controller/status.py", "from steps.tune import config", "the controller reaches steps/ only through",
     "controller.status -> steps.tune.config"),
    ("steps/smoke_test.py", "from steps.push_adapter import main", "the steps are independent of each other",
     "steps.smoke_test -> steps.push_adapter"),
]


@pytest.mark.parametrize(("module", "planted", "contract", "chain"), PLANTS, ids=[p[2] for p in PLANTS])
def test_a_planted_violation_breaks_its_contract(tmp_path: Path, module: str, planted: str, contract: str, chain: str):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}  # noqa\n")
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    names = {c["name"] for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["name"].startswith(contract)}
    report = " ".join(result.stdout.split())  # import-linter wraps long contract names
    assert [n for n in names if f"{n} BROKEN" in report], result.stdout
    assert chain in result.stdout


def test_the_independence_contract_names_every_step():
    contract, = [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == "independence"]
    steps = {p.stem for p in (ROOT / "steps").iterdir() if not p.name.startswith(("_", "."))}
    assert {m.removeprefix("steps.") for m in contract["modules"]} == steps


def test_no_private_name_is_imported_across_packages():
    crossing = []  # tests may reach into what they test; the packages may not reach into each other
    for path in (p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))):
        home = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top = node.module.split(".")[0]
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if top in OURS and top != home and private:
                    crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {', '.join(private)}")
    assert not crossing, "\n".join(crossing)


def _declared() -> set[str]:
    project = PYPROJECT["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += [s for s in extra if not s.startswith("kaiflow")]
    return {_normalise(Requirement(s).name) for s in specs}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _direct_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def _modules():
    for folder in sorted(OURS):
        if (ROOT / folder).is_dir():
            yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_directly_imported_third_party_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = []
    checked = 0
    for path in _modules():
        for top, line in _direct_imports(path):
            if top in OURS or top in sys.stdlib_module_names or top == "__future__":
                continue
            checked += 1
            providers = {_normalise(d) for d in distributions.get(top, [])}
            if not providers & declared:
                undeclared.append(f"{path.relative_to(ROOT)}:{line}: {top} (distribution "
                                  f"{', '.join(sorted(providers)) or 'not installed'}) is not in pyproject.toml")
    assert checked > 50  # the walk found the third-party imports
    assert not undeclared, "\n".join(undeclared)


def test_the_walk_sees_imports_inside_functions(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import torch.nn\n    from peft import LoraConfig\n")
    assert list(_direct_imports(module)) == [("os", 1), ("torch", 4), ("peft", 5)]


def test_light_entry_points_import_no_ml_stack():
    code = ("import sys, api, presets, pipelines, local_runner.runner, pipelines.templates, stepkit.common, kaiflow.cli; "
            f"print(sorted(set({sorted(HEAVY)!r}) & {{m.split('.')[0] for m in sys.modules}}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_only_bench_imports_the_test_fixtures():
    """bench/ reuses tests/fixtures (the registry, the Kubernetes API, the controller process): the one
    exception, stated in DEVELOPERS.md. Nothing else outside tests/ imports tests."""
    found = []
    for path in _modules():
        folder = path.relative_to(ROOT).parts[0]
        if folder == "tests":
            continue
        for top, line in _direct_imports(path):
            if top == "tests":
                module = _imported_module(path, line)
                if folder != "bench" or not module.startswith("tests.fixtures"):
                    found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)


def _imported_module(path: Path, line: int) -> str:
    for node in ast.walk(ast.parse(path.read_text())):
        if getattr(node, "lineno", None) == line:
            if isinstance(node, ast.ImportFrom):
                return node.module or ""
            if isinstance(node, ast.Import):
                return next(a.name for a in node.names if a.name.split(".")[0] == "tests")
    return "tests"


# -- imports inside functions -------------------------------------------------------------------

# What a cold ``import X`` costs, measured here (polyglot kind, 2 cores, 2026-12-06, the median of
# three ``python -c "import time; t=time.perf_counter(); import X; print(time.perf_counter()-t)"``
# runs, in ms). Imports of these may wait until a function needs them: a CLI's ``--help``, the
# controller and the light steps do not pay for them. DEVELOPERS.md ("Imports") has the same table.
IMPORT_COST_MS = {
    "torch": 1350, "peft": 4600, "bitsandbytes": 3400, "accelerate": 1260, "datasets": 610,
    "transformers": 550, "kopf": 360, "matplotlib": 200, "kubernetes": 180, "azure": 150, "trl": 140,
    "pyarrow": 140, "numpy": 110, "httpx": 90, "bentoml": 70, "jsonschema": 50, "urllib3": 50,
    "typer": 35, "croniter": 29, "pydantic": 29, "hera": 25,
}


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside functions; ``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.update(_absolute(path, node))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def _absolute(path: Path, node: ast.ImportFrom) -> list[str]:
    """``from .x import y`` / ``from a.b import c`` as absolute module names (``a.b`` and ``a.b.c``)."""
    if node.level:
        package = list(path.relative_to(ROOT).with_suffix("").parts)[: -node.level]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _costly(name: str, seen: dict[str, bool]) -> bool:
    """True when importing ``name`` imports, at some depth, a package of IMPORT_COST_MS.

    A walk over every module reachable through top-level imports (packages' ``__init__`` first);
    ``seen`` keeps the answer per asked name (not per module on the way: a cycle would freeze a
    half-computed one)."""
    if name not in seen:
        reached, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module in reached:
                continue
            reached.add(module)
            if module.split(".")[0] in IMPORT_COST_MS:
                break
            parts = module.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]
            file = _module_file(module)
            if file is not None:
                todo += sorted(_top_level_imports(file))
        seen[name] = any(m.split(".")[0] in IMPORT_COST_MS for m in reached)
    return seen[name]


def _imports_inside_functions(path: Path):
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            elif isinstance(inner, ast.ImportFrom):
                names = _absolute(path, inner)[:1]
            else:
                continue
            above = inner.lineno - 2  # the comment may head a group of imports
            while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            said = "#" in lines[inner.lineno - 1] or (above >= 0 and lines[above].strip().startswith("#"))
            yield inner.lineno, names, said


def test_an_import_inside_a_function_is_a_measured_cost_or_says_why():
    """Imports go at the top of a module, unless the module is costly to import (IMPORT_COST_MS, or one
    of ours that imports such a package when it is imported) or a comment beside it says why."""
    seen: dict[str, bool] = {}
    unexplained, lazy = [], 0
    for path in _modules():
        if path.relative_to(ROOT).parts[0] in ("tests", "bench", "examples"):
            continue
        for line, names, said in _imports_inside_functions(path):
            lazy += 1
            if not said and not any(_costly(n, seen) for n in names):
                unexplained.append(f"{path.relative_to(ROOT)}:{line}: import {', '.join(names)} inside a function: "
                                   "move it to the top, or say why beside it")
    assert lazy > 50  # the walk saw them
    assert not unexplained, "\n".join(unexplained)


def test_the_cost_walk_follows_our_own_modules():
    assert _costly("pipelines.dags", {})  # hera, at its top
    assert _costly("api.labels", {})  # its package's __init__ imports pydantic
    assert not _costly("stepkit.common", {})
    assert not _costly("presets", {})
    assert not _costly("json", {})
