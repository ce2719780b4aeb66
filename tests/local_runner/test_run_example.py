"""`kaiflow run` end to end: the tiny-model tuning example, every task, on this machine.

Real steps, a real registry (tests/fixtures/registry.py), a real BentoML server. The test then
checks that what ran is what the Argo YAML says: same tasks in the same order, same arguments up
to the substitutions ``pipelines.target.Target`` defines, and parameters passed between tasks as
Argo would pass them.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import pipelines
from pipelines import Images, Target
from local_runner.runner import run
from pipelines.structure import topological_order, workflow_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "local_tuning_tiny.yaml"


@pytest.fixture
def tiny_workspace(tmp_path: Path, oci_registry) -> Path:
    """The example, pointed at the test registry; its data and config copied beside it."""
    folder = tmp_path / "ws"
    shutil.copytree(ROOT / "examples" / "data", folder / "data", ignore=shutil.ignore_patterns("*.py"))
    shutil.copytree(ROOT / "examples" / "configs", folder / "configs")
    workspace = yaml.safe_load(EXAMPLE.read_text())
    workspace["tuning"]["output"]["image"] = f"{oci_registry.host}/kaiflow/tiny-tuning-adapter:v1"
    path = folder / "workspace.yaml"
    path.write_text(yaml.safe_dump(workspace))
    return path


def _flags(args: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
            flags.setdefault(arg, []).append(value)
    return flags


def _fill(arg: str, arguments: dict[str, str], workflow_parameters: dict[str, str]) -> str:
    for key, value in arguments.items():
        arg = arg.replace(f"{{{{inputs.parameters.{key}}}}}", value)
    for key, value in workflow_parameters.items():
        arg = arg.replace(f"{{{{workflow.parameters.{key}}}}}", value)
    return arg


@pytest.mark.slow
def test_kaiflow_run_executes_every_task_of_the_tiny_tuning_example(tiny_workspace: Path, tmp_path: Path, oci_registry):
    from steps.deploy.local_service import stop_local

    workdir = tmp_path / "work"
    out = io.StringIO()
    try:
        result = run(tiny_workspace, workdir, console=Console(file=out, width=120))
        # resuming a finished run re-runs nothing
        again = run(tiny_workspace, workdir, resume=True, console=Console(file=io.StringIO()))
    finally:
        stop_local(workdir / "serve")

    # every task ran and succeeded, in the order of the Argo DAG
    cluster = pipelines.manifest(tiny_workspace, Target.cluster(images=Images(), provider="aks", insecure_registries=()))
    spec = workflow_spec(cluster)
    dag = next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])["dag"]["tasks"]
    order = topological_order(dag)
    assert order == ["provision-nodes", "fetch-dataset", "tune", "push-adapter", "deploy-inference", "smoke-test"]
    assert result.order == order
    assert {n: r.status for n, r in result.tasks.items()} == dict.fromkeys(order, "Succeeded"), out.getvalue()
    assert [r.started for r in again.tasks.values()] == [r.started for r in result.tasks.values()]

    # the executed command lines are the Argo templates' (up to the Target's substitutions) ...
    templates = {t["name"]: t for t in spec["templates"]}
    tasks = {t["name"]: t for t in dag}
    # Argo fills {{workflow.parameters.X}} from spec.arguments; the local manifest's own values
    # (file URLs made absolute) are what ran
    local_spec = workflow_spec(result.manifest)
    workflow_parameters = {p["name"]: p["value"] for p in local_spec["arguments"]["parameters"]}
    target_defined = {"--outputs", "--output-dir", "--dataset-dir", "--checkpoint-dir", "--adapter-dir", "--url",
                      "--config", "--provider", "--mode", "--insecure", "--adapters-dir", "--workdir", "--port",
                      "--adapter-image", "--image", "--gpus", "--node-label", "--dataset-digest", "--attach",
                      # cluster-only: the operator makes the nodes, fetch reaches public addresses only,
                      # tune runs one process per GPU the pod requests
                      "--wait-only", "--public-only", "--nproc"}
    for name in order:
        executed = result.tasks[name].command
        argo = templates[tasks[name]["template"]]["container"]
        assert executed[1:3] == argo["command"][1:3] == ["-m", argo["command"][2]]
        # Argo fills {{inputs.parameters.X}} from the task's arguments; the runner must have done the same
        argo_args = [_fill(a, result.tasks[name].arguments, workflow_parameters) for a in argo["args"]]
        argo_flags, local_flags = _flags(argo_args), _flags(executed[3:])
        shared = {f: v for f, v in argo_flags.items() if f not in target_defined}
        assert shared == {f: v for f, v in local_flags.items() if f in shared}, name
        assert set(argo_flags) - target_defined <= set(local_flags), name

    # ... and parameters flowed between tasks as Argo passes them
    digest = result.output("fetch-dataset", "dataset-digest")
    assert digest.startswith("sha256:")
    assert _flags(result.tasks["tune"].command)["--dataset-digest"] == [digest]
    assert result.tasks["tune"].arguments == {"dataset-digest": digest}
    pushed = result.output("push-adapter", "image")
    assert result.tasks["deploy-inference"].arguments == {"adapter-image": pushed}
    service_url = result.output("deploy-inference", "service-url")
    assert _flags(result.tasks["smoke-test"].command)["--url"] == [service_url]
    assert service_url.startswith("http://127.0.0.1:")

    # the adapter really is in the registry under the Workspace's tag, with the pushed digest
    request = urllib.request.Request(
        f"http://{oci_registry.host}/v2/kaiflow/tiny-tuning-adapter/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}, method="HEAD")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"] == result.output("push-adapter", "adapter-digest")

    # progress, logs and the loss-curve artifacts are where the runner says
    assert result.tasks["tune"].progress.endswith("/4") and result.tasks["tune"].progress.split("/")[0] == "4"
    for name in order:
        assert (workdir / "logs" / f"{name}.log").stat().st_size > 0
    assert set(result.tasks["tune"].artifacts) == {"loss-curve", "loss-history", "training-log"}
    assert Path(result.tasks["tune"].artifacts["training-log"]).stat().st_size > 0  # KAIFLOW_STEP_LOG
    history = json.loads(Path(result.tasks["tune"].artifacts["loss-history"]).read_text())
    assert history
    assert float(result.output("tune", "eval-loss")) > 0
    state = json.loads((workdir / "state.json").read_text())
    assert [t["status"] for t in state["tasks"].values()] == ["Succeeded"] * len(order)
