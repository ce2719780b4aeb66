"""The pipeline image's Dockerfile names the same dependencies as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXTRAS = ("ml", "oci", "serve", "controller", "azure")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _dockerfile_requirements() -> dict[str, Requirement]:
    """Every quoted requirement on a `RUN pip install` line (continuations joined)."""
    text = _dockerfile().replace("\\\n", " ")
    found: dict[str, Requirement] = {}
    for line in text.splitlines():
        if re.match(r"\s*RUN\s+pip install", line):
            install = line.split("&&", 1)[0]
            for spec in re.findall(r'"([^"]+)"', install):
                req = Requirement(spec.replace("${TORCH_VERSION}", _arg("TORCH_VERSION")))
                found[req.name.lower()] = req
    return found


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", _dockerfile(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1)


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        specs += project["optional-dependencies"][extra]
    return {Requirement(s).name.lower(): Requirement(s) for s in specs}


def test_dockerfile_installs_exactly_the_pyproject_dependencies():
    image = _dockerfile_requirements()
    project = _pyproject_requirements()
    assert sorted(image) == sorted(project), (
        f"only in Dockerfile: {sorted(set(image) - set(project))}; only in pyproject: {sorted(set(project) - set(image))}"
    )
    for name, req in project.items():
        assert str(image[name].specifier) == str(req.specifier), f"{name}: Dockerfile {image[name]} vs pyproject {req}"


def test_dockerfile_torch_is_the_pinned_version_from_a_cuda_index():
    pinned = next(r for r in _pyproject()["project"]["optional-dependencies"]["ml"] if r.startswith("torch"))
    assert pinned == f"torch=={_arg('TORCH_VERSION')}"
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", _arg("TORCH_INDEX_URL"))


def test_dockerfile_copies_every_package_pyproject_ships():
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) \./", _dockerfile(), re.MULTILINE))
    for pattern in includes:
        package = pattern.rstrip("*")
        assert package in copied, f"Dockerfile does not COPY {package}/"
        assert (ROOT / package).is_dir()
    assert "pip install --no-deps ." in _dockerfile()


def test_dockerfile_user_is_the_uid_the_workflows_run_as():
    from pipelines.images import PIPELINE_UID, Images

    assert int(_arg("KAIFLOW_UID")) == PIPELINE_UID == Images().pipeline_uid
    assert re.search(r"^USER \$\{KAIFLOW_UID\}$", _dockerfile(), re.MULTILINE)
    # the base image's own uid-1000 user is removed first, else useradd --uid 1000 fails
    assert "userdel --remove ubuntu" in _dockerfile()
