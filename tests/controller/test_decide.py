"""The reconcile decision is a pure function: names, labels, owner, refusals, lifetime options."""

from pathlib import Path

import yaml

from api.labels import ANNOTATION_IMMUTABLE, ANNOTATION_OWNER, LABEL_GENERATION, LABEL_WORKSPACE
from api.workspace_status import REASON_IMMUTABLE, REASON_INVALID
from controller.decide import Desired, Refused, decide, pipeline_name
from controller.options import ControllerOptions
from controller.status import refused

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def body(example: str, generation: int = 1, uid: str = "0f0f-uid", **extra):
    obj = yaml.safe_load((EXAMPLES / example).read_text())
    obj["metadata"] = {"namespace": "default", **obj["metadata"], "generation": generation, "uid": uid,
                       "resourceVersion": "7", "creationTimestamp": "2026-11-30T10:00:00Z"}
    obj["status"] = {"conditions": [{"type": "ResourceReady", "status": "True"}], "somethingKaitoWrote": 1}
    obj.update(extra)
    return obj


def test_tuning_workspace_gets_one_named_workflow_with_owner_and_labels():
    verdict = decide(body("kaito_workspace_tuning_phi_3.yaml", generation=3), ControllerOptions())
    assert isinstance(verdict, Desired)
    assert verdict.kind == "Workflow" and verdict.name == "workspace-tuning-phi-3-mini-tuning-3"
    meta = verdict.manifest["metadata"]
    assert meta["name"] == verdict.name and "generateName" not in meta
    assert meta["labels"][LABEL_WORKSPACE] == "workspace-tuning-phi-3-mini"
    assert meta["labels"][LABEL_GENERATION] == "3"
    assert meta["annotations"][ANNOTATION_OWNER] == "kaito.sh/Workspace/default/workspace-tuning-phi-3-mini"
    assert meta["ownerReferences"] == [{"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace",
                                        "name": "workspace-tuning-phi-3-mini", "uid": "0f0f-uid",
                                        "controller": True, "blockOwnerDeletion": True}]
    assert '"tuning.method": "qlora"' in meta["annotations"][ANNOTATION_IMMUTABLE]
    assert verdict.target_node_count == 1 and verdict.is_tuning
    # Same input, same answer: what makes replays and restarts converge.
    assert decide(body("kaito_workspace_tuning_phi_3.yaml", generation=3), ControllerOptions()) == verdict


def test_schedule_becomes_one_cronworkflow_per_workspace():
    verdict = decide(body("scheduled_tuning_phi_3.yaml", generation=2), ControllerOptions())
    assert isinstance(verdict, Desired) and verdict.kind == "CronWorkflow"
    assert verdict.name.endswith("-tuning") and verdict.manifest["kind"] == "CronWorkflow"


def test_lifetime_options_reach_the_workflow():
    options = ControllerOptions(workflow_ttl_s=600, pod_gc="OnWorkflowCompletion")
    spec = decide(body("kaito_workspace_phi_3.yaml"), options).manifest["spec"]
    assert spec["ttlStrategy"] == {"secondsAfterCompletion": 600}
    assert spec["podGC"] == {"strategy": "OnWorkflowCompletion", "deleteDelayDuration": "24h"}  # the delay stays


def test_invalid_workspace_is_refused_naming_the_field():
    bad = body("kaito_workspace_tuning_phi_3.yaml")
    bad["tuning"]["method"] = "dora"
    bad["resource"]["count"] = 0
    verdict = decide(bad, ControllerOptions())
    assert isinstance(verdict, Refused) and verdict.reason == REASON_INVALID
    assert "tuning.method" in verdict.fields and "resource.count" in verdict.fields
    assert "tuning.method" in verdict.message


def test_immutable_change_is_refused_naming_the_field():
    first = decide(body("kaito_workspace_tuning_phi_3.yaml"), ControllerOptions())
    import json

    accepted = json.loads(first.manifest["metadata"]["annotations"][ANNOTATION_IMMUTABLE])
    changed = body("kaito_workspace_tuning_phi_3.yaml", generation=2)
    changed["tuning"]["preset"]["name"] = "phi-3-medium-4k-instruct"
    verdict = decide(changed, ControllerOptions(), accepted)
    assert isinstance(verdict, Refused) and verdict.reason == REASON_IMMUTABLE
    assert verdict.fields == ("tuning.preset.name",)
    allowed = body("kaito_workspace_tuning_phi_3.yaml", generation=2)
    allowed["tuning"]["input"]["urls"] = ["https://example.com/other.parquet"]
    assert isinstance(decide(allowed, ControllerOptions(), accepted), Desired)


def test_local_target_renders_for_the_runner(tmp_path):
    options = ControllerOptions(target="local", local_root=str(tmp_path), local_base_dir=str(EXAMPLES))
    verdict = decide(body("local_tuning_tiny.yaml"), options)
    text = yaml.safe_dump(verdict.manifest)
    assert str(tmp_path / "default" / verdict.name / "data") in text
    assert "--mode\n      - local" in text or "- local" in text


def test_names_fit_argo_and_stay_unique():
    long = "w" * 70
    assert len(pipeline_name(long, "inference", 12)) <= 63
    assert pipeline_name(long, "inference", 12) != pipeline_name(long, "inference", 13)
    assert pipeline_name("short", "inference", 1) == "short-inference-1"


def test_more_nodes_than_the_installs_per_workspace_cap_are_refused_naming_resource_count():
    """Issue 17, Medium 7: nodes are provisioned before any pod exists, so no namespace quota sees
    them; the operator caps them per Workspace (default small) and the status names the field."""
    big = body("kaito_workspace_phi_3.yaml")
    big["resource"]["count"] = 100
    verdict = decide(big, ControllerOptions())
    assert isinstance(verdict, Refused) and verdict.reason == REASON_INVALID and verdict.fields == ("resource.count",)
    assert verdict.message.startswith("resource.count: 100 nodes exceed this install's cap of 4 per Workspace")
    assert "--max-nodes-per-workspace" in verdict.message
    assert ControllerOptions().max_nodes_per_workspace == 4
    assert isinstance(decide(big, ControllerOptions(max_nodes_per_workspace=100)), Desired)
    status = refused(big["status"], verdict.reason, verdict.message, 1).status
    condition = next(c for c in status["conditions"] if c["type"] == "WorkspaceSucceeded")
    assert condition["status"] == "False" and "resource.count" in condition["message"] and status["state"] == "Failed"
