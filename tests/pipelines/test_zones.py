"""Zones: the data volume is first used on the GPU node, so a WaitForFirstConsumer StorageClass (AKS's
built-in ones) makes the disk in that node's zone; a zonal disk made elsewhere could never attach to
the tune pod."""

from __future__ import annotations

from pathlib import Path

import pipelines
from pipelines import Images, Target
from pipelines.names import TASK_FETCH_DATASET, TASK_TUNE
from pipelines.structure import workflow_spec
from pipelines.tasks import DATA_VOLUME

ROOT = Path(__file__).resolve().parents[2]


def test_fetch_dataset_the_volumes_first_consumer_runs_where_tune_runs_without_a_gpu():
    target = Target.cluster(images=Images(), provider="aks", insecure_registries=())
    for example in ("kaito_workspace_tuning_phi_3.yaml", "kaito_workspace_tuning_with_configmap.yaml",
                    "scheduled_tuning_phi_3.yaml"):
        spec = workflow_spec(pipelines.manifest(ROOT / "examples" / example, target))
        templates = {t["name"]: t for t in spec["templates"]}
        fetch, tune = templates[TASK_FETCH_DATASET], templates[TASK_TUNE]
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert fetch.get(key) == tune.get(key), (example, key)
        assert fetch.get("nodeSelector") or fetch.get("affinity"), example
        assert "nvidia.com/gpu" not in str((fetch["container"].get("resources") or {}))
        # nothing before fetch-dataset mounts the data volume
        dag = next(t["dag"]["tasks"] for t in spec["templates"]
                   if t.get("dag") and any(x["name"] == TASK_FETCH_DATASET for x in t["dag"]["tasks"]))
        order = [t["name"] for t in dag]
        for task in order[:order.index(TASK_FETCH_DATASET)]:
            mounts = templates[next(t["template"] for t in dag if t["name"] == task)]["container"].get("volumeMounts") or []
            assert all(m["name"] != DATA_VOLUME for m in mounts), (example, task)
