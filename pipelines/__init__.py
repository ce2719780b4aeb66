"""The one Hera definition of every kaiflow DAG and its renderings (the local runner is ``local_runner``).

Public face:

* ``build(workspace, target=None)`` - the Hera ``Workflow``/``CronWorkflow`` for a Workspace.
* ``render(workspace, target=None)`` - its YAML (what ``kaiflow render`` prints).
* ``pipelines.templates`` - ``python -m pipelines.templates workflow_templates/``.
* ``pipelines.structure.check(manifest)`` - the structural checks Argo's loose schema does not do.

Light to import: hera and pydantic only (no torch), so ``kaiflow validate``/``render`` stay fast.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipelines.dags import PipelineError, build
from pipelines.images import Images
from pipelines.target import Target


def to_yaml(manifest: dict[str, Any]) -> str:
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=120)


def manifest(workspace: Any, target: Target | None = None, service_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Workflow/CronWorkflow as a plain dict (what Argo receives).

    ``service_env``: the chat service's settings from the Workspace's ``inference.config`` ConfigMap
    (``api.inference_config.read_inference_config(cm).as_env()``), when the caller has it.
    """
    return build(_as_workspace(workspace), target, service_env).to_dict()


def render(workspace: Any, target: Target | None = None, service_env: dict[str, str] | None = None) -> str:
    """YAML of the Workflow (or CronWorkflow for a scheduled tuning Workspace)."""
    return to_yaml(manifest(workspace, target, service_env))


def _as_workspace(workspace: Any) -> Any:
    if isinstance(workspace, str | bytes) or hasattr(workspace, "__fspath__") or isinstance(workspace, dict):
        from api import load_workspace

        return load_workspace(workspace)
    return workspace


__all__ = ["Images", "PipelineError", "Target", "build", "manifest", "render", "to_yaml"]
