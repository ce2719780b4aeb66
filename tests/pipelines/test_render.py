"""Golden YAML for every example: re-render and compare (like hera's own examples).

Regenerate after an intended change with ``KAIFLOW_UPDATE_GOLDEN=1 pytest tests/pipelines/test_render.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import pipelines
from pipelines import Images, Target
from pipelines.structure import problems, workflow_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def cluster_target() -> Target:
    # Fixed images/provider: golden files must not depend on the rendering machine's environment.
    return Target.cluster(images=Images(), provider="aks", insecure_registries=())


def rendered(example: Path) -> str:
    return pipelines.render(example, cluster_target())


def test_examples_cover_every_kind_of_workspace():
    kinds = set()
    for example in EXAMPLES:
        manifest = yaml.safe_load(rendered(example))
        spec = workflow_spec(manifest)
        tasks = {t["name"] for t in spec["templates"][-1]["dag"]["tasks"]}
        kinds.add((manifest["kind"], spec["entrypoint"], "pull-adapters" in tasks))
    assert ("Workflow", "tuning", False) in kinds
    assert ("CronWorkflow", "tuning", False) in kinds
    assert ("Workflow", "inference", False) in kinds
    assert ("Workflow", "inference", True) in kinds


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_render_matches_golden(example: Path):
    text = rendered(example)
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("KAIFLOW_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {example.name}: run with KAIFLOW_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{example.name} renders differently from {golden}"


def test_every_example_has_a_golden_file_and_no_golden_file_is_stale():
    assert {p.stem for p in GOLDEN.glob("*.yaml")} == {e.stem for e in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_rendered_examples_pass_hera_schema_and_structure(example: Path, tmp_path: Path):
    assert problems(yaml.safe_load(rendered(example))) == []
    local = pipelines.manifest(example, Target.local(tmp_path, base_dir=example.parent, port=3999))
    assert problems(local) == []


def test_tuning_dag_order_and_parameter_passing():
    manifest = yaml.safe_load(rendered(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml"))
    spec = workflow_spec(manifest)
    dag = {t["name"]: t for t in spec["templates"][-1]["dag"]["tasks"]}
    assert list(dag) == ["provision-nodes", "fetch-dataset", "tune", "push-adapter", "deploy-inference", "smoke-test"]
    assert dag["tune"]["depends"] == "fetch-dataset"
    assert dag["tune"]["arguments"]["parameters"] == [
        {"name": "dataset-digest", "value": "{{tasks.fetch-dataset.outputs.parameters.dataset-digest}}"}]
    assert dag["smoke-test"]["arguments"]["parameters"] == [
        {"name": "service-url", "value": "{{tasks.deploy-inference.outputs.parameters.service-url}}"}]
    templates = {t["name"]: t for t in spec["templates"]}
    tune = templates["tune"]
    # GPU scheduling from the preset and resource.instanceType (Standard_NC6s_v3: 1 x V100).
    assert tune["container"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert tune["nodeSelector"] == {"app": "phi-3-adapter"}
    assert {t["key"] for t in tune["tolerations"]} == {"nvidia.com/gpu", "sku"}
    assert {a["name"] for a in tune["outputs"]["artifacts"]} == {"loss-curve", "loss-history", "training-log", "tensorboard"}
    # network steps retry with backoff, but never on exit code 2 (bad input)
    for name in ("provision-nodes", "fetch-dataset", "push-adapter"):
        assert templates[name]["retryStrategy"]["expression"] == "asInt(lastRetry.exitCode) != 2"
        assert templates[name]["retryStrategy"]["backoff"]["factor"] == 2
    assert "retryStrategy" not in tune
    # data flows through a per-workflow PVC, mounted by every data step
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "kaiflow-data"
    for name in ("fetch-dataset", "tune", "push-adapter"):
        assert {"mountPath": "/kaiflow/data", "name": "kaiflow-data"} in templates[name]["container"]["volumeMounts"]
    # every object says which Workspace it belongs to
    assert manifest["metadata"]["labels"]["kaito.sh/workspace"] == "workspace-tuning-phi-3-mini"
    assert manifest["metadata"]["annotations"]["kaiflow.kaito.sh/owner"] == "kaito.sh/Workspace/default/workspace-tuning-phi-3-mini"
    assert spec["podMetadata"]["labels"]["kaito.sh/workspace"] == "workspace-tuning-phi-3-mini"
    assert all(t.get("activeDeadlineSeconds") for t in spec["templates"] if "container" in t)


def test_scheduled_tuning_is_a_forbid_cronworkflow_with_an_eval_gate():
    manifest = yaml.safe_load(rendered(ROOT / "examples" / "scheduled_tuning_phi_3.yaml"))
    assert manifest["kind"] == "CronWorkflow"
    assert manifest["spec"]["schedules"] == ["0 3 * * 0"]
    assert manifest["spec"]["concurrencyPolicy"] == "Forbid"
    spec = workflow_spec(manifest)
    dag = {t["name"]: t for t in spec["templates"][-1]["dag"]["tasks"]}
    assert dag["eval-gate"]["depends"] == "tune"
    assert dag["push-adapter"]["when"] == "{{tasks.eval-gate.outputs.parameters.promote}} == true"
    assert dag["push-candidate"]["when"] == "{{tasks.eval-gate.outputs.parameters.promote}} != true"
    assert dag["deploy-inference"]["depends"] == "push-adapter.Succeeded"
    templates = {t["name"]: t for t in spec["templates"]}
    push_args = templates["push-adapter"]["container"]["args"]
    assert push_args[push_args.index("--tag") + 1] == "auto"
    assert push_args[push_args.index("--also-tag") + 1] == "latest"
    assert "--also-tag" not in templates["push-candidate"]["container"]["args"]
    gate_args = templates["eval-gate"]["container"]["args"]
    # the repository is a workflow argument: resubmitting with -p output-repository=... moves it
    assert gate_args[gate_args.index("--current-image") + 1] == "{{workflow.parameters.output-repository}}:latest"
    arguments = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    assert arguments["output-repository"] == "myregistry.azurecr.io/adapters/phi-3-weekly"
    # the gate scores both adapters on the candidate's held-out rows, on the tune's GPU nodes
    assert gate_args[gate_args.index("--dataset-dir") + 1] == templates["tune"]["container"]["args"][
        templates["tune"]["container"]["args"].index("--dataset-dir") + 1]
    assert templates["eval-gate"]["nodeSelector"] == templates["tune"]["nodeSelector"]


def test_inference_with_adapters_pulls_then_deploys_with_strengths():
    manifest = yaml.safe_load(rendered(ROOT / "examples" / "inference_phi_3_with_adapters.yaml"))
    spec = workflow_spec(manifest)
    dag = {t["name"]: t for t in spec["templates"][-1]["dag"]["tasks"]}
    assert list(dag) == ["provision-nodes", "pull-adapters", "deploy-inference", "smoke-test"]
    templates = {t["name"]: t for t in spec["templates"]}
    args = templates["deploy-inference"]["container"]["args"]
    assert args[args.index("--mode") + 1] == "cluster"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--adapter"] == ["dolly:1.0", "kubernetes-faq:0.5"]
    pull = templates["pull-adapters"]["container"]["args"]
    assert [pull[i + 1] for i, a in enumerate(pull) if a == "--adapter"] == [
        "dolly=myregistry.azurecr.io/adapters/phi-3-dolly:0.0.1",
        "kubernetes-faq=myregistry.azurecr.io/adapters/phi-3-k8s-faq:0.0.2",
    ]


def test_image_references_are_configurable_per_install(monkeypatch):
    monkeypatch.setenv("KAIFLOW_PIPELINE_IMAGE", "registry.example/acme/kaiflow-pipeline:9.9")
    monkeypatch.setenv("KAIFLOW_SERVING_IMAGE", "registry.example/acme/chat:9.9")
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_phi_3.yaml")
    templates = [t for t in manifest["spec"]["templates"] if "container" in t]
    assert {t["container"]["image"] for t in templates} == {"registry.example/acme/kaiflow-pipeline:9.9"}
    deploy = next(t for t in templates if t["name"] == "deploy-inference")["container"]["args"]
    assert deploy[deploy.index("--image") + 1] == "registry.example/acme/chat:9.9"


def test_local_target_changes_only_what_target_defines(tmp_path: Path):
    """Cluster and local renderings share DAG, templates and arguments, up to the Target's substitutions."""
    example = ROOT / "examples" / "local_tuning_tiny.yaml"
    cluster = workflow_spec(pipelines.manifest(example, cluster_target()))
    local_target = Target.local(tmp_path, base_dir=example.parent, port=4321)
    local = workflow_spec(pipelines.manifest(example, local_target))
    assert cluster["templates"][-1]["dag"] == local["templates"][-1]["dag"]
    cluster_t = {t["name"]: t for t in cluster["templates"] if "container" in t}
    local_t = {t["name"]: t for t in local["templates"] if "container" in t}
    # the exit handler releases cluster nodes; the local provider makes none
    assert cluster["onExit"] == "exit-handler" and "onExit" not in local
    assert cluster_t.pop("release-nodes")
    assert cluster_t.keys() == local_t.keys()
    c_params = {p["name"]: p["value"] for p in cluster["arguments"]["parameters"]}
    l_params = {p["name"]: p["value"] for p in local["arguments"]["parameters"]}
    assert c_params.pop("release-nodes") == "on-failure"
    assert c_params.pop("dataset-url") == "file:data/demo_chat.parquet"
    assert l_params.pop("dataset-url") == (example.parent / "data" / "demo_chat.parquet").as_uri()
    assert c_params == l_params == {"output-image": "127.0.0.1:5000/kaiflow/tiny-tuning-adapter:v1"}

    def localise(arg: str) -> str:
        arg = arg.replace("/kaiflow/data", local_target.data_root).replace("/tmp/kaiflow/outputs", local_target.outputs_dir)
        return arg

    for name, template in cluster_t.items():
        c_args = [localise(a) for a in template["container"]["args"]]
        l_args = list(local_t[name]["container"]["args"])
        assert template.get("inputs") == local_t[name].get("inputs")
        assert _output_names(template) == _output_names(local_t[name])
        if name == "provision-nodes":
            c_args[c_args.index("--provider") + 1] = "local"
        if name == "deploy-inference":
            # Same service and adapters; where they come from is the Target's business: local
            # reads the data folder and serves on a port, a cluster's pods pull the pushed image.
            c_args[c_args.index("--mode") + 1] = "local"
            assert c_args[:8] == l_args[:8]
            assert _values(c_args, "--adapter") == _values(l_args, "--adapter") == ["tiny-tuning:1.0"]
            assert _values(c_args, "--adapter-image") == ["tiny-tuning={{inputs.parameters.adapter-image}}"]
            assert _values(l_args, "--adapters-dir") == [local_target.data("adapters")]
            assert _values(l_args, "--port") == ["4321"]
            continue
        if name in ("tune", "fetch-dataset"):  # both read the training config (fetch: its DatasetConfig)
            c_args[c_args.index("--config") + 1] = str(example.parent / "configs" / "tiny_training_config.yaml")
        if name == "push-adapter":
            c_args.insert(c_args.index("--image") + 2, "--insecure")  # 127.0.0.1 is plain http locally
        if name == "fetch-dataset":  # in a cluster, the URL may reach public addresses only (issue 17)
            c_args.remove("--public-only")
        if name == "tune":  # a cluster pod trains with one process per GPU it requests (issue 22)
            index = c_args.index("--nproc")
            assert c_args[index + 1] == str(_gpu_request(template))
            del c_args[index:index + 2]
        assert c_args == l_args, name


def _gpu_request(template: dict) -> int:
    return int(template["container"]["resources"]["limits"]["nvidia.com/gpu"])


def _output_names(template: dict) -> list[str]:
    return [p["name"] for p in (template.get("outputs") or {}).get("parameters") or []]


def _values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_an_api_key_secret_is_referenced_by_the_deployment_and_the_smoke_test():
    """Annotation kaiflow.kaito.sh/api-key-secret: the service requires the key; its value never appears."""
    spec = yaml.safe_load((ROOT / "examples" / "kaito_workspace_phi_3.yaml").read_text())
    spec["metadata"]["annotations"] = {"kaiflow.kaito.sh/api-key-secret": "chat-api-key"}
    templates = {t["name"]: t for t in workflow_spec(pipelines.manifest(spec, cluster_target()))["templates"]}
    deploy_args = templates["deploy-inference"]["container"]["args"]
    assert deploy_args[deploy_args.index("--api-key-secret") + 1] == "chat-api-key"
    env = {e["name"]: e for e in templates["smoke-test"]["container"]["env"]}
    assert env["KAIFLOW_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "chat-api-key", "key": "api-key"}
    # without the annotation the service is open, as Kaito's is
    plain = workflow_spec(pipelines.manifest(ROOT / "examples" / "kaito_workspace_phi_3.yaml", cluster_target()))
    assert "--api-key-secret" not in next(t for t in plain["templates"] if t["name"] == "deploy-inference")[
        "container"]["args"]
