"""The contract between pipelines/ and steps/: every command line a rendered Workflow or a
WorkflowTemplate runs is accepted by the step's own argument parser.

Without this a misspelled or removed flag would only show on a cluster. Each container's
``python -m steps.<name> ARGS`` is parsed by calling the step's ``main`` with ``parse_args``
intercepted: the step builds its parser exactly as in a pod, parses, and the test stops it there.
Placeholders are filled the way Argo would fill them: workflow arguments and template inputs with
their values or defaults, anything only known at run time (another task's output) with a sample.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines import Images, Target
from pipelines.structure import REFERENCE, workflow_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TEMPLATES = sorted((ROOT / "workflow_templates").glob("*.yaml"))
# values only known while the workflow runs: a sample of the right shape
RUNTIME_SAMPLE = "sample-runtime-value"


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def _commands(manifest: dict):
    spec = workflow_spec(manifest)
    workflow = {p["name"]: str(p.get("value", RUNTIME_SAMPLE)) for p in (spec.get("arguments") or {}).get("parameters") or []}
    for template in spec["templates"]:
        container = template.get("container")
        if container is None:
            continue
        # Argo fills the entrypoint's inputs from the workflow's arguments (argo submit -p ...)
        given = workflow if template["name"] == spec.get("entrypoint") else {}
        inputs = {p["name"]: str(p.get("value", p.get("default", given.get(p["name"], RUNTIME_SAMPLE))))
                  for p in (template.get("inputs") or {}).get("parameters") or []}

        def fill(match, inputs=inputs) -> str:
            kind, _, name = match.group(1).rpartition(".")
            if kind == "workflow.parameters":
                return workflow.get(name, RUNTIME_SAMPLE)
            if kind == "inputs.parameters":
                value = inputs.get(name, RUNTIME_SAMPLE)
                return value if "{{" not in value else RUNTIME_SAMPLE
            return RUNTIME_SAMPLE

        args = [REFERENCE.sub(fill, str(a)) for a in container.get("args") or []]
        yield template["name"], container["command"], args


def _manifests(tmp: Path):
    cluster = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    for example in EXAMPLES:
        yield f"{example.stem} (cluster)", pipelines.manifest(example, cluster)
        local = Target.local(tmp / example.stem, base_dir=example.parent, port=3000)
        yield f"{example.stem} (local)", pipelines.manifest(example, local)
    for path in TEMPLATES:
        yield path.name, yaml.safe_load(path.read_text())


def _parse_with_step(module_name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):  # a package step: python -m steps.provision runs its __main__
        module = importlib.import_module(f"{module_name}.__main__")
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        try:
            module.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"{module_name}.main returned without parsing its arguments")


def test_every_rendered_command_parses_with_its_steps_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]):
    refused = []
    parsed = 0
    for where, manifest in _manifests(tmp_path):
        for template, command, args in _commands(manifest):
            assert command[:2] == ["python", "-m"] and command[2].startswith("steps."), f"{where} {template}: {command}"
            try:
                _parse_with_step(command[2], args, monkeypatch)
                parsed += 1
            except SystemExit:
                error = capsys.readouterr().err.strip().splitlines()[-1:]
                refused.append(f"{where} template {template}: python -m {command[2]} {' '.join(args)}\n    {error}")
    assert parsed >= 100  # every example twice plus every WorkflowTemplate
    assert not refused, "\n".join(refused)


def test_a_wrong_flag_is_caught(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    manifest = yaml.safe_load((ROOT / "workflow_templates" / "kaiflow-fetch-dataset.yaml").read_text())
    (_, command, args), = list(_commands(manifest))
    namespace = _parse_with_step(command[2], args, monkeypatch)
    assert namespace.url == [RUNTIME_SAMPLE]
    with pytest.raises(SystemExit):
        _parse_with_step(command[2], [*args, "--output-folder", "/data"], monkeypatch)
    assert "unrecognized arguments: --output-folder" in capsys.readouterr().err


def _steps_package_listing() -> set[str]:
    """Every name directly under ``steps/``: a module or a package (``__init__`` aside)."""
    listed = set()
    for path in (ROOT / "steps").iterdir():
        if path.name.startswith(("_", ".")):
            continue
        if path.is_dir():
            assert (path / "__init__.py").is_file(), f"steps/{path.name}/ is not a package"
            listed.add(path.name)
        elif path.suffix == ".py":
            listed.add(path.stem)
        else:
            raise AssertionError(f"steps/{path.name}: only step modules and packages live under steps/")
    return listed


def test_steps_lists_exactly_the_steps_the_pipelines_run(tmp_path: Path):
    """``ls steps`` is the list of DAG steps: each one is rendered by pipelines/tasks.py and has a main()."""
    rendered = {command[2].removeprefix("steps.") for _, manifest in _manifests(tmp_path)
                for _, command, _ in _commands(manifest)}
    assert _steps_package_listing() == rendered
    for name in sorted(rendered):
        module = importlib.import_module(f"steps.{name}")
        if not hasattr(module, "main"):
            module = importlib.import_module(f"steps.{name}.__main__")
        assert callable(module.main), f"steps.{name} has no main()"
