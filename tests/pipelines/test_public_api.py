"""The surface the CLI and the controller use, and the import rule that keeps `render` light."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pipelines
from local_runner import runner
from pipelines import templates


def test_public_names():
    assert set(pipelines.__all__) == {"Images", "PipelineError", "Target", "build", "manifest", "render", "to_yaml"}
    assert list(inspect.signature(pipelines.render).parameters) == ["workspace", "target", "service_env"]
    assert list(inspect.signature(runner.run).parameters)[:3] == ["workspace_path", "workdir", "resume"]
    assert list(inspect.signature(runner.run_cli).parameters)[:3] == ["workspace_path", "workdir", "resume"]
    assert callable(templates.main)


def test_the_surface_the_controller_fixture_uses():
    # it plays Argo by running submitted manifests: LocalRun(manifest, workdir, resume=...).execute()
    params = inspect.signature(runner.LocalRun).parameters
    assert list(params)[:2] == ["manifest", "workdir"] and params["resume"].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(runner.LocalRun.execute).return_annotation in ("RunResult", runner.RunResult)
    assert list(inspect.signature(runner.RunFailed).parameters) == ["task", "exit_code", "log_path", "log_tail", "reason"]
    assert list(inspect.signature(pipelines.manifest).parameters) == ["workspace", "target", "service_env"]
    # its script mode evaluates DAG conditions with the runner's own functions
    from local_runner import expressions

    assert (runner.evaluate_depends, runner.evaluate_when, runner.substitute) == (
        expressions.evaluate_depends, expressions.evaluate_when, expressions.substitute)


def test_rendering_imports_no_ml_library():
    code = (
        "import sys, pipelines, local_runner.runner, pipelines.templates; "
        "pipelines.render('examples/kaito_workspace_tuning_phi_3.yaml'); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'bentoml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pipelines.__file__.rsplit("/pipelines/", 1)[0])
    assert out.stdout.strip() == "[]"
