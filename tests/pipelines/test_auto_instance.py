"""A Workspace with no instanceType: the node provisioned, the GPUs the tune pod requests and the
GPUs the Deployment requests all come from one pick (presets.gpus.pick_instance: fewest GPUs that
hold the model, then the cheapest), so the tune step asks for exactly the GPUs of the node it gets."""

from __future__ import annotations

import pytest

import pipelines
from pipelines import Images, Target
from pipelines.names import TASK_DEPLOY, TASK_PROVISION, TASK_TUNE
from pipelines.structure import workflow_spec


def _tuning(model: str) -> dict:
    return {"apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "metadata": {"name": "auto", "namespace": "default"},
            "resource": {"labelSelector": {"matchLabels": {"app": "auto"}}},
            "tuning": {"preset": {"name": model, "presetOptions": {"modelAccessSecret": "hf-token"}}, "method": "qlora",
                       "input": {"urls": ["https://example.com/data.parquet"]},
                       "output": {"image": "registry.example.com/auto:1", "imagePushSecret": "push"}}}


def _template(manifest: dict, name: str) -> dict:
    return next(t for t in workflow_spec(manifest)["templates"] if t["name"] == name)


@pytest.mark.parametrize(("model", "sku"), [("qwen2.5-coder-32b-instruct", "Standard_NC24ads_A100_v4"),
                                            ("deepseek-r1-distill-qwen-14b", "Standard_NC24ads_A100_v4"),
                                            ("phi-3-mini-4k-instruct", "Standard_NC4as_T4_v3")])
def test_tuning_with_no_instance_type_provisions_one_gpu_and_the_tune_pod_requests_it(model, sku):
    manifest = pipelines.manifest(_tuning(model), Target.cluster(images=Images(), provider="aks", insecure_registries=()))
    provision = _template(manifest, TASK_PROVISION)["container"]["args"]
    assert provision[provision.index("--instance-type") + 1] == sku
    tune = _template(manifest, TASK_TUNE)["container"]["resources"]
    assert tune["requests"]["nvidia.com/gpu"] == tune["limits"]["nvidia.com/gpu"] == "1"
    deploy = _template(manifest, TASK_DEPLOY)["container"]["args"]
    assert deploy[deploy.index("--gpus") + 1] == "1"
