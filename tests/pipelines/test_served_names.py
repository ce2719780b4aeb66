"""The name clients send is the one the docs promise, in a cluster as locally.

For every model of ``kaiflow presets -o json`` (kaiflow's presets and Kaito's catalogue) an
inference Workspace is rendered for the cluster; the deploy task's own command line is parsed by
the deploy step and turned into the Deployment it would apply: the chat container's
``KAIFLOW_SERVED_MODEL_NAME`` must be the ``servedModelName`` the CLI prints, and the smoke test
must check ``/v1/models`` for that same name. Locally, the service computes its id from the
preset (``serving_bento.config.ServiceConfig.model_id``) and must agree too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines
from api.inference_config import SERVED_NAME_ENV
from pipelines import Images, PipelineError, Target
from pipelines.names import TASK_DEPLOY, TASK_SMOKE_TEST
from pipelines.structure import workflow_spec
from serving_bento.config import ServiceConfig
from steps.deploy import build_parser
from steps.deploy.cluster import ClusterOptions, cluster_deployment
from steps.deploy.manifests import render_deployment
from stepkit.common import dataclass_from_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_presets() -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "kaiflow.cli", "presets", "-o", "json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _workspace(model: str) -> dict:
    return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace",
            "metadata": {"name": "served", "namespace": "default"},
            "resource": {"labelSelector": {"matchLabels": {"app": "served"}}},
            "inference": {"preset": {"name": model,
                                     "presetOptions": {"modelAccessSecret": "hf-token"}}}}


def _template(manifest: dict, name: str) -> dict:
    return next(t for t in workflow_spec(manifest)["templates"] if t["name"] == name)


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _deployment(args: list[str]) -> dict:
    parsed = build_parser().parse_args(args)
    options = dataclass_from_args(ClusterOptions, parsed)
    return render_deployment(cluster_deployment(parsed.workspace_name, parsed.preset, {}, options))


def _env(deployment: dict) -> dict[str, str]:
    chat = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "chat")
    return {e["name"]: e.get("value") for e in chat["env"]}


def test_every_catalogue_model_is_served_in_a_cluster_by_the_name_kaiflow_presets_prints(cli_presets):
    target = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    checked, refused, wrong = [], [], []
    for row in cli_presets:
        try:
            manifest = pipelines.manifest(_workspace(row["name"]), target)
        except (PipelineError, ValueError) as exc:  # e.g. too big for one node (multi-node inference)
            refused.append(f"{row['name']}: {str(exc).splitlines()[0]}")
            continue
        deploy_args = _template(manifest, TASK_DEPLOY)["container"]["args"]
        served = _env(_deployment(deploy_args))[SERVED_NAME_ENV]
        smoke = _flag(_template(manifest, TASK_SMOKE_TEST)["container"]["args"], "--model")
        local = ServiceConfig(model=row["name"]).model_id()
        if not (served == smoke == local == row["servedModelName"]):
            wrong.append(f"{row['name']}: deployment {served!r}, smoke test {smoke!r}, local {local!r}, "
                         f"kaiflow presets {row['servedModelName']!r}")
        checked.append(row["name"])
    assert not wrong, "\n".join(wrong)
    # every model that can be served on one node was checked; the rest are refused for that reason
    assert len(checked) + len(refused) == len(cli_presets)
    assert len(checked) >= 50, refused
    assert all("node" in r or "unsupported" in r or "fits" in r for r in refused), refused


def test_the_legacy_name_is_served_by_kaitos_name_not_the_preset():
    target = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    manifest = pipelines.manifest(_workspace("mistral-7b-instruct"), target)
    assert _env(_deployment(_template(manifest, TASK_DEPLOY)["container"]["args"]))[SERVED_NAME_ENV] \
        == "mistral-7b-instruct-v0.3"
    assert _flag(_template(manifest, TASK_SMOKE_TEST)["container"]["args"], "--model") == "mistral-7b-instruct-v0.3"


def test_an_inference_configmaps_served_model_name_wins_in_the_deployment_and_the_smoke_test():
    target = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    manifest = pipelines.manifest(_workspace("mistral-7b-instruct"), target, service_env={SERVED_NAME_ENV: "chat"})
    assert _env(_deployment(_template(manifest, TASK_DEPLOY)["container"]["args"]))[SERVED_NAME_ENV] == "chat"
    assert _flag(_template(manifest, TASK_SMOKE_TEST)["container"]["args"], "--model") == "chat"
