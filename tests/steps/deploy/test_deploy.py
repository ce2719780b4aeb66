"""steps.deploy: flags, and the cluster rollout against the emulated API over HTTP (steps.deploy.cluster)."""

from __future__ import annotations

import json
import time

import pytest

from stepkit.common import RetryableError, StepError, run_step
from steps.deploy import DeployConfig, main, parse_strengths
from steps.deploy.cluster import ClusterOptions, cluster_deployment, deploy_cluster, rollout_state
from steps.deploy.local import local_adapters
from steps.deploy.manifests import AdapterImage, ClusterDeployment

UID = "3f1c0a8e-1111-2222-3333-444455556666"
PRESET = "phi-3-mini-4k-instruct"
DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
SERVICES = "/api/v1/namespaces/default/services"


def test_flags_build_the_cluster_deployment():
    d = cluster_deployment("w", PRESET, {"tone": 0.25}, ClusterOptions(
        image="img", adapter_image={"tone": "reg/tone:v1"}, node_label={"a": "b"}, model_access_secret="hf"))
    assert d.adapters == (AdapterImage("tone", "reg/tone:v1", 0.25),) and d.node_labels == {"a": "b"}
    assert d.model_access_secret == "hf"
    # sized from the preset's weights (3.82 B parameters in bfloat16 ≈ 7.1 GiB)
    assert (d.memory_request, d.cache_size) == ("12Gi", "10Gi")
    overridden = cluster_deployment("w", PRESET, {}, ClusterOptions(image="i", memory_request="30Gi", cache_size="50G"))
    assert (overridden.memory_request, overridden.cache_size) == ("30Gi", "50G")


def test_a_gated_preset_needs_the_model_access_secret():
    from presets.catalog import list_presets

    gated = next((p.name for p in list_presets() if p.gated), None)
    if gated is None:
        pytest.fail("the catalog has no gated preset to test with")
    with pytest.raises(StepError, match=f"--model-access-secret: preset {gated} is gated"):
        cluster_deployment("w", gated, {}, ClusterOptions(image="i"))
    assert cluster_deployment("w", gated, {}, ClusterOptions(image="i", model_access_secret="hf")).model_access_secret


CLUSTER = ["--mode", "cluster", "--workspace-name", "w", "--preset", PRESET]


@pytest.mark.parametrize(("argv", "message"), [
    (CLUSTER, "--image is required"),
    ([*CLUSTER, "--image", "i", "--adapter", "x:0.5"], "no --adapter-image x=IMAGE"),
    ([*CLUSTER, "--image", "i", "--adapter", "x:lots", "--adapter-image", "x=r/x:1"], "strength 'lots' is not a number"),
    ([*CLUSTER, "--image", "i", "--node-label", "novalue"], "--node-label: expected KEY=VALUE, got 'novalue'"),
    ([*CLUSTER, "--image", "i", "--replicas", "0"], "--replicas: must be >= 1"),
    ([*CLUSTER, "--image", "i", "--memory-request", "lots"], "--memory-request: 'lots' is not a size"),
    ([*CLUSTER, "--image", "i", "--cpu-request", "two"], "--cpu-request: 'two'"),
    (["--mode", "cluster", "--workspace-name", "w", "--preset", "gpt-17", "--image", "i"], "--preset: unknown preset 'gpt-17'"),
    (["--mode", "local", "--workspace-name", "w", "--preset", "gpt-17"], "unknown preset 'gpt-17'"),
    (["--mode", "local", "--workspace-name", "w"], "--preset is required"),
    (["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test", "--adapter", "a:1"],
     "--adapter needs --adapters-dir"),
    (["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test", "--adapters-dir", "/nonexistent"],
     "--adapters-dir /nonexistent: no such folder"),
])
def test_bad_flags_are_one_line_exit_2(argv, message, capsys, tmp_path):
    assert run_step(main, [*argv, "--outputs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_strengths():
    assert parse_strengths(["a:0.5", "b"]) == {"a": 0.5, "b": 1.0}
    with pytest.raises(StepError, match="strength must be >= 0"):
        parse_strengths(["a:-1"])


def test_local_adapters_from_a_pulled_folder(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / ".oci-cache").mkdir()
    all_of_them = local_adapters({}, str(tmp_path))
    assert [(a["name"], a["strength"]) for a in all_of_them] == [("a", 1.0), ("b", 1.0)]
    chosen = local_adapters({"b": 0.3}, str(tmp_path))
    assert chosen == [{"name": "b", "path": str((tmp_path / "b").resolve()), "strength": 0.3}]
    with pytest.raises(StepError, match="--adapter c"):
        local_adapters({"c": 1.0}, str(tmp_path))


def test_deploy_config_fields_belong_to_both_modes():
    """A field only one mode reads belongs in that mode's options (the help says no 'local mode:')."""
    from dataclasses import fields

    for f in fields(DeployConfig):
        assert "mode:" not in f.metadata["help"], f.name


# ---------------------------------------------------------------------------- cluster mode


def cluster_argv(kube, outputs, *extra):
    return ["--mode", "cluster", "--workspace-name", "ws-phi", "--preset", PRESET, "--namespace", "default",
            "--image", "kaiflow:test", "--workspace-uid", UID, "--adapter", "tone:0.5",
            "--adapter-image", "tone=reg.example/tone:v1", "--node-label", "apps=phi-3",
            "--api-key-secret", "chat-key", "--model-access-secret", "hf-token",
            "--kubeconfig", str(kube.kubeconfig), "--ready-timeout", "30", "--outputs", str(outputs), *extra]


def test_cluster_apply_and_wait_for_the_rollout(kube, tmp_path, capsys):
    with kube.simulate_deployments("default") as rolled:
        assert run_step(main, cluster_argv(kube, tmp_path)) == 0, capsys.readouterr().err
    assert rolled == ["default/ws-phi"]
    assert (tmp_path / "service-url").read_text() == "http://ws-phi.default.svc.cluster.local:80"
    deployment = kube.get(f"{DEPLOYMENTS}/ws-phi")
    service = kube.get(f"{SERVICES}/ws-phi")
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == UID
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"apps": "phi-3"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in [*pod["initContainers"], *pod["containers"]])
    assert all(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if "emptyDir" in v)
    chat = pod["containers"][0]
    assert chat["startupProbe"]["httpGet"]["path"] == "/readyz" and chat["livenessProbe"]["timeoutSeconds"] == 10
    assert chat["resources"]["requests"]["memory"] == "12Gi"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KAIFLOW_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "chat-key", "key": "api-key"}}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert service["spec"]["ports"][0]["port"] == 80
    uid = deployment["metadata"]["uid"]

    # A second rollout (new strength) updates the same objects and waits for the new generation.
    argv = cluster_argv(kube, tmp_path)
    argv[argv.index("tone:0.5")] = "tone:0.8"
    with kube.simulate_deployments("default"):
        assert run_step(main, argv) == 0, capsys.readouterr().err
    deployment = kube.get(f"{DEPLOYMENTS}/ws-phi")
    assert deployment["metadata"]["uid"] == uid and deployment["metadata"]["generation"] == 2
    assert deployment["status"]["observedGeneration"] == 2
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["KAIFLOW_ADAPTERS"])[0]["strength"] == 0.8


@pytest.mark.parametrize(("kind", "path", "labels"), [
    ("Deployment", DEPLOYMENTS, {"app": "someone-elses"}),
    ("Service", SERVICES, {"app.kubernetes.io/managed-by": "kaiflow", "kaito.sh/workspace": "another-ws"}),
])
def test_a_same_named_stranger_is_not_touched(kube, tmp_path, capsys, kind, path, labels):
    stranger = {"metadata": {"name": "ws-phi", "labels": labels}}
    if kind == "Deployment":
        stranger["spec"] = {"replicas": 3, "selector": {"matchLabels": {"app": "x"}}, "template": {}}
    else:
        stranger["spec"] = {"ports": [{"port": 8080}]}
    kube.create(path, stranger)
    assert run_step(main, cluster_argv(kube, tmp_path, "--ready-timeout", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{kind} default/ws-phi already exists and is not kaiflow's for Workspace ws-phi" in err
    assert kube.get(f"{path}/ws-phi")["spec"] == stranger["spec"]  # untouched
    if kind == "Service":  # nothing was written before the check failed
        assert kube.list(DEPLOYMENTS) == []


def test_cluster_readiness_deadline_is_a_clear_error(kube):
    d = ClusterDeployment(workspace_name="never-ready", namespace="default", preset=PRESET, image="i", gpus=0)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="0/1 replicas ready; the new spec is not observed yet after 1 s"):
        deploy_cluster(d, ready_timeout=1, kubeconfig=str(kube.kubeconfig), poll=0.2)
    assert time.monotonic() - started < 60  # it ends (never ready would wait forever); generous for a loaded machine


def test_rollout_state_is_judged_like_kubectl():
    def dep(generation=2, **status):
        return {"metadata": {"name": "d", "namespace": "ns", "generation": generation}, "status": status}

    done = dict(observedGeneration=2, replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    assert rollout_state(dep(**done), 1) == (True, "1/1 replicas ready")
    # the old pod is still ready, but the new spec is not rolled out
    assert rollout_state(dep(**{**done, "observedGeneration": 1}), 1)[0] is False
    assert rollout_state(dep(**{**done, "updatedReplicas": 0}), 1)[0] is False
    surge = rollout_state(dep(**{**done, "replicas": 2}), 1)
    assert surge == (False, "1/1 replicas ready; 1 old replica(s) still terminating")
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "d-1" has timed out progressing.'}
    with pytest.raises(RetryableError, match="has timed out progressing"):
        rollout_state(dep(**{**done, "conditions": [stuck]}), 1)


def test_cluster_without_credentials_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    argv = ["--mode", "cluster", "--workspace-name", "w", "--preset", PRESET, "--image", "i",
            "--outputs", str(tmp_path)]
    assert run_step(main, argv) == 2
    assert "--kubeconfig: cannot load Kubernetes credentials" in capsys.readouterr().err



def test_the_deadline_names_what_holds_the_pods(kube):
    pods = "/api/v1/namespaces/default/pods"
    labels = {"kaito.sh/workspace": "stuck"}
    kube.create(pods, {"metadata": {"name": "stuck-1", "labels": labels}, "spec": {"containers": []}})
    kube.patch(f"{pods}/stuck-1/status", {"status": {"phase": "Pending", "initContainerStatuses": [{
        "name": "pull-adapters", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                       "message": 'Back-off pulling image "kaiflow:nope"'}}}]}})
    kube.create(pods, {"metadata": {"name": "stuck-2", "labels": labels}, "spec": {"containers": []}})
    kube.patch(f"{pods}/stuck-2/status", {"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}})
    d = ClusterDeployment(workspace_name="stuck", namespace="default", preset=PRESET, image="i")
    with pytest.raises(RetryableError) as error:
        deploy_cluster(d, ready_timeout=0.5, kubeconfig=str(kube.kubeconfig), poll=0.1)
    message = str(error.value)
    assert 'stuck-1 pull-adapters ImagePullBackOff (Back-off pulling image "kaiflow:nope")' in message
    assert "stuck-2 Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in message


def test_service_settings_from_the_inference_config_reach_the_deployment():
    from steps.deploy.cluster import ClusterOptions, cluster_deployment
    from steps.deploy.manifests import render_deployment

    options = ClusterOptions(image="img:1", service_env={"KAIFLOW_MAX_PROMPT_TOKENS": "3584"},
                             model_access_secret="hf-token")
    deployment = render_deployment(cluster_deployment("ws", "phi-3-mini-4k-instruct", {}, options))
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KAIFLOW_MAX_PROMPT_TOKENS"]["value"] == "3584"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}


def test_service_env_takes_only_the_services_own_settings():
    from steps.deploy.cluster import ClusterOptions, cluster_deployment

    with pytest.raises(StepError, match="--service-env PATH"):
        cluster_deployment("ws", "phi-3-mini-4k-instruct", {}, ClusterOptions(image="img:1", service_env={"PATH": "/x"}))


def test_a_generic_hf_model_needs_explicit_sizes():
    from steps.deploy.cluster import ClusterOptions, cluster_deployment

    with pytest.raises(StepError, match="--memory-request and --cache-size"):
        cluster_deployment("ws", "someorg/some-model", {}, ClusterOptions(image="img:1"))
    d = cluster_deployment("ws", "someorg/some-model", {},
                           ClusterOptions(image="img:1", memory_request="20Gi", cache_size="30Gi"))
    assert (d.memory_request, d.cache_size) == ("20Gi", "30Gi")
