"""steps.deploy: rendered manifests, cluster apply-and-wait against the emulated API, local mode."""

from __future__ import annotations

import json
import threading
import time

import pytest

from steps.common import RetryableError, StepError, run_step
from steps.deploy import DeployConfig, chat, cluster_deployment, deploy_cluster, local_adapters, main, stop_local
from steps.deploy_manifests import (
    BENTO_PORT,
    AdapterImage,
    ClusterDeployment,
    render_deployment,
    render_service,
    service_url,
)

UID = "3f1c0a8e-1111-2222-3333-444455556666"


def make(**kw) -> ClusterDeployment:
    base = dict(workspace_name="ws-phi", namespace="team-a", preset="phi-3-mini-4k-instruct",
                image="ghcr.io/example/kaiflow:1.0", workspace_uid=UID,
                adapters=(AdapterImage("tone", "registry.example.com/tone:v1", 0.5),
                          AdapterImage("legal", "registry.example.com/legal@sha256:" + "a" * 64, 1.0)),
                gpus=2, node_labels={"apps": "phi-3"}, docker_config_secret="regcred", api_key_secret="chat-key")
    base.update(kw)
    return ClusterDeployment(**base)


def chat_container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_service_is_named_after_the_workspace_on_port_80():
    svc = render_service(make())
    assert svc["metadata"]["name"] == "ws-phi" and svc["metadata"]["namespace"] == "team-a"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    deployment = render_deployment(make())
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert service_url("ws-phi", "team-a") == "http://ws-phi.team-a.svc.cluster.local:80"


def test_chat_container_serves_bento_with_probes():
    c = chat_container(render_deployment(make()))
    assert c["command"][:3] == ["bentoml", "serve", "serving_bento.service:KaiflowChat"]
    assert c["ports"] == [{"name": "http", "containerPort": BENTO_PORT, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    env = env_of(c)
    assert env["KAIFLOW_MODEL"] == "phi-3-mini-4k-instruct" and env["BENTOML_DO_NOT_TRACK"] == "True"


def test_init_container_pulls_adapters_the_service_reads_with_strengths():
    d = render_deployment(make())
    pod = d["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["python", "-m", "steps.pull_adapters"]
    args = init["command"]
    assert args[args.index("--dest") + 1] == "/adapters"
    assert ["--adapter", "tone=registry.example.com/tone:v1"] == args[3:5]
    assert args[args.index("--docker-config") + 1] == "/var/run/kaiflow/docker/config.json"
    assert {"name": "docker-config", "secret": {"secretName": "regcred", "items": [
        {"key": ".dockerconfigjson", "path": "config.json"}]}} in pod["volumes"]
    adapters = json.loads(env_of(chat_container(d))["KAIFLOW_ADAPTERS"])
    assert adapters == [{"name": "tone", "path": "/adapters/tone", "strength": 0.5},
                        {"name": "legal", "path": "/adapters/legal", "strength": 1.0}]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in chat_container(d)["volumeMounts"]


def test_no_adapters_means_no_init_container():
    d = render_deployment(make(adapters=(), docker_config_secret=""))
    assert "initContainers" not in d["spec"]["template"]["spec"]
    assert "KAIFLOW_ADAPTERS" not in env_of(chat_container(d))


def test_gpus_node_selector_and_toleration():
    d = render_deployment(make())
    pod = d["spec"]["template"]["spec"]
    assert chat_container(d)["resources"] == {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}
    assert pod["nodeSelector"] == {"apps": "phi-3"}
    assert pod["tolerations"] == [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    cpu = render_deployment(make(gpus=0, node_labels={}))
    assert "resources" not in chat_container(cpu) and "nodeSelector" not in cpu["spec"]["template"]["spec"]


def test_owner_reference_and_api_key_by_reference_only():
    for manifest in (render_deployment(make()), render_service(make())):
        assert manifest["metadata"]["ownerReferences"] == [{
            "apiVersion": "kaito.sh/v1beta1", "kind": "Workspace", "name": "ws-phi", "uid": UID,
            "controller": True, "blockOwnerDeletion": True}]
    env = env_of(chat_container(render_deployment(make())))
    assert env["KAIFLOW_API_KEY"] == {"secretKeyRef": {"name": "chat-key", "key": "api-key"}}
    assert "ownerReferences" not in render_deployment(make(workspace_uid=""))["metadata"]


def test_flags_build_the_cluster_deployment():
    config = DeployConfig(mode="cluster", workspace_name="w", preset="p", image="img",
                          adapter=["tone:0.25"], adapter_image=["tone=reg/tone:v1"], node_label=["a=b"])
    d = cluster_deployment(config)
    assert d.adapters == (AdapterImage("tone", "reg/tone:v1", 0.25),) and d.node_labels == {"a": "b"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--mode", "cluster", "--workspace-name", "w", "--preset", "p"], "--image is required"),
    (["--mode", "cluster", "--workspace-name", "w", "--preset", "p", "--image", "i", "--adapter", "x:0.5"],
     "no --adapter-image x=IMAGE"),
    (["--mode", "cluster", "--workspace-name", "w", "--preset", "p", "--image", "i", "--adapter", "x:lots",
      "--adapter-image", "x=r/x:1"], "strength 'lots' is not a number"),
    (["--mode", "cluster", "--workspace-name", "w", "--preset", "p", "--image", "i", "--node-label", "novalue"],
     "--node-label 'novalue'"),
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


def test_local_adapters_from_a_pulled_folder(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / ".oci-cache").mkdir()
    all_of_them = local_adapters(DeployConfig(adapters_dir=str(tmp_path)))
    assert [(a["name"], a["strength"]) for a in all_of_them] == [("a", 1.0), ("b", 1.0)]
    chosen = local_adapters(DeployConfig(adapters_dir=str(tmp_path), adapter=["b:0.3"]))
    assert chosen == [{"name": "b", "path": str((tmp_path / "b").resolve()), "strength": 0.3}]
    with pytest.raises(StepError, match="--adapter c"):
        local_adapters(DeployConfig(adapters_dir=str(tmp_path), adapter=["c:1"]))


# ---------------------------------------------------------------------------- cluster mode


def play_kubelet(kube, name, namespace, ready_after=0.3):
    """The emulator has no controllers: mark the Deployment's pods ready once it exists."""
    stop = threading.Event()

    def run():
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"
        while not stop.wait(0.05):
            try:
                kube.get(path)
            except Exception:
                continue
            time.sleep(ready_after)
            kube.patch(path + "/status", {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}})
            return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return stop


def test_cluster_apply_and_wait_for_readiness(kube_env, tmp_path, capsys):
    stop = play_kubelet(kube_env, "ws-phi", "default")
    argv = ["--mode", "cluster", "--workspace-name", "ws-phi", "--preset", "phi-3-mini-4k-instruct",
            "--namespace", "default", "--image", "kaiflow:test", "--workspace-uid", UID,
            "--adapter", "tone:0.5", "--adapter-image", "tone=reg.example/tone:v1", "--node-label", "apps=phi-3",
            "--ready-timeout", "30", "--outputs", str(tmp_path)]
    try:
        assert run_step(main, argv) == 0, capsys.readouterr().err
    finally:
        stop.set()
    assert (tmp_path / "service-url").read_text() == "http://ws-phi.default.svc.cluster.local:80"
    deployment = kube_env.get("/apis/apps/v1/namespaces/default/deployments/ws-phi")
    service = kube_env.get("/api/v1/namespaces/default/services/ws-phi")
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == UID
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"apps": "phi-3"}
    assert service["spec"]["ports"][0]["port"] == 80
    # a second rollout (new strength) patches what exists instead of failing on 409
    argv[argv.index("tone:0.5")] = "tone:0.8"
    assert run_step(main, argv) == 0, capsys.readouterr().err
    deployment = kube_env.get("/apis/apps/v1/namespaces/default/deployments/ws-phi")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["KAIFLOW_ADAPTERS"])[0]["strength"] == 0.8


def test_cluster_readiness_deadline_is_a_clear_error(kube_env):
    d = ClusterDeployment(workspace_name="never-ready", namespace="default", preset="p", image="i", gpus=0)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="0/1 replicas ready after 1 s"):  # exit 1: the pipeline retries
        deploy_cluster(d, ready_timeout=1, poll=0.2)
    assert time.monotonic() - started < 10


def test_cluster_without_credentials_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    d = ClusterDeployment(workspace_name="w", namespace="default", preset="p", image="i")
    with pytest.raises(StepError, match="no Kubernetes credentials") as error:
        deploy_cluster(d, ready_timeout=1)
    assert not isinstance(error.value, RetryableError)


# ---------------------------------------------------------------------------- local mode


def test_chat_and_stop_helpers_against_the_running_service(bento_tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("KAIFLOW_API_KEY", bento_tiny.api_key)
    by_url = chat(bento_tiny.url, "hello", max_new_tokens=4, temperature=0)
    by_workdir = chat(bento_tiny.workdir, "hello", max_new_tokens=4, temperature=0)
    assert isinstance(by_url, str) and by_url == by_workdir
    monkeypatch.setenv("KAIFLOW_API_KEY", "wrong")
    with pytest.raises(StepError, match="answered 401"):
        chat(bento_tiny.url, "hello")
    with pytest.raises(StepError, match="no running service"):
        chat(tmp_path, "hello")
    assert stop_local(tmp_path) is False


def test_local_deploy_reports_a_failed_model_load(tmp_path, capsys):
    broken = tmp_path / "adapters" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["nope"], "r": 4}')
    argv = ["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test",
            "--adapters-dir", str(tmp_path / "adapters"), "--workdir", str(tmp_path / "serve"),
            "--ready-timeout", "120", "--outputs", str(tmp_path / "out")]
    assert run_step(main, argv) == 2
    err = capsys.readouterr().err
    assert "failed to load its model" in err and "KAIFLOW_ADAPTERS" in err
    assert not (tmp_path / "serve" / "service.json").exists()


def test_a_port_in_use_is_refused(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test", "--port", str(port),
                "--workdir", str(tmp_path / "serve"), "--outputs", str(tmp_path / "out")]
        assert run_step(main, argv) == 2
    assert f"--port {port}: another process already listens there" in capsys.readouterr().err


def test_a_shared_port_is_detected():
    """BentoML listens with SO_REUSEPORT; start_local must notice a second listener on its port."""
    import socket

    from steps.deploy import listeners_on

    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    with first, socket.socket() as second:
        assert listeners_on(port) == 1
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", port))
        second.listen()
        assert listeners_on(port) == 2


def test_local_deploy_chat_and_stop_end_to_end(tmp_path, tiny_adapters, capsys):
    """What `kaiflow run` / `kaiflow chat` / `kaiflow stop` do: deploy, ask, stop; no process left."""
    from steps.deploy import _pid_is_bento, read_service_file

    adapters_dir = tiny_adapters["alpha"].parent
    workdir = tmp_path / "serve"
    argv = ["--mode", "local", "--workspace-name", "demo", "--preset", "kaiflow-tiny-test",
            "--adapters-dir", str(adapters_dir), "--adapter", "alpha:0.5", "--workdir", str(workdir),
            "--ready-timeout", "180", "--outputs", str(tmp_path / "out")]
    try:
        assert run_step(main, argv) == 0, capsys.readouterr().err
        url = (tmp_path / "out" / "service-url").read_text()
        info = read_service_file(workdir)
        assert info["url"] == url and url.startswith("http://127.0.0.1:")
        assert info["adapters"] == [{"name": "alpha", "path": str(adapters_dir / "alpha"), "strength": 0.5}]
        assert isinstance(chat(workdir, "hello", max_new_tokens=4), str)
        port = int(url.rsplit(":", 1)[1])
        assert run_step(main, argv + ["--port", str(port)]) == 0  # a redeploy replaces the service
        replaced = read_service_file(workdir)
        assert replaced["pid"] != info["pid"] and not _pid_is_bento(info["pid"]) and replaced["port"] == port
        assert isinstance(chat(workdir, "hello", max_new_tokens=4), str)
    finally:
        stopped = stop_local(workdir)
    assert stopped and not _pid_is_bento(replaced["pid"]) and read_service_file(workdir) is None
