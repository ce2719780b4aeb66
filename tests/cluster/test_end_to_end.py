"""From ``kubectl apply`` of the tiny tuning Workspace to a chat answer, every step really run (issue 16).

Real: the API server (RBAC, the install's accounts), the operator as its ServiceAccount, Argo's
workflow-controller scheduling the DAG, kube-scheduler placing the pods on the nodes the fake
Karpenter made for the operator's NodeClaims, the OCI registry (htpasswd, the Workspace's
``imagePushSecret``), the dataset's HTTP server, and **every step's command**: the node agent runs
each pod's containers as local processes (tests/fixtures/pod_runtime.py: the volumes as folders
bound at their mount paths, the pod's env and ServiceAccount token, the namespace's Services at
loopback addresses), so provision-nodes waits for the claims as ``kaiflow-provisioner``, the fetch
step downloads and checks the parquet, the tune step LoRA-trains the tiny model, push-adapter pushes
to the registry, deploy rolls out the Deployment and Service as ``kaiflow-deployer``, the chat pod's
init container pulls the adapter and ``bentoml serve`` answers, and smoke-test asks it through the
Service's name. What stands in: the image (this checkout's venv), the container isolation (a mount
namespace, the node's network, this machine's user) and Argo's executor (the agent reports outputs
as it does), docs/testing.md.

The registry and the dataset server listen on 127.0.0.1 and are reached by names the pods'
``/etc/hosts`` gives (``registry.box.test``, ``datasets.box.test``): the Workspace validation refuses
loopback literals in a cluster, and the fetch step's egress check refuses the resolved loopback
address unless the admin allows the range (``--dataset-allow-cidr``, as for an in-house mirror).
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import workspace_file
from tests.fixtures.cluster import wait_until

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["provision-nodes", "fetch-dataset", "tune", "push-adapter", "deploy-inference", "smoke-test"]


@pytest.mark.slow
def test_tiny_tuning_from_kubectl_apply_to_a_chat_answer(installed, tenant, fake_karpenter, argo_agent,
                                                          start_controller, oci_registry_auth, http_files):
    box = installed
    registry = f"registry.box.test:{oci_registry_auth.host.rsplit(':', 1)[1]}"
    runtime = argo_agent.run_pods(tenant, hosts={"registry.box.test": "127.0.0.1", "datasets.box.test": "127.0.0.1"})
    http_files.add("e2e_demo_chat.parquet", (ROOT / "examples" / "data" / "demo_chat.parquet").read_bytes())
    url = http_files.url("e2e_demo_chat.parquet").replace("127.0.0.1", "datasets.box.test")

    auth = base64.b64encode(f"{oci_registry_auth.username}:{oci_registry_auth.password}".encode()).decode()
    docker_config = json.dumps({"auths": {registry: {"auth": auth}}})
    box.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
               "metadata": {"name": "regcred", "namespace": tenant},
               "data": {".dockerconfigjson": base64.b64encode(docker_config.encode()).decode()}},
              {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-training", "namespace": tenant},
               "data": {"training_config.yaml": (ROOT / "examples" / "configs" / "tiny_training_config.yaml").read_text()}})
    ws = workspace_file("local_tuning_tiny.yaml", tenant)
    name = ws["metadata"]["name"]
    ws["tuning"]["config"] = "tiny-training"
    ws["tuning"]["input"]["urls"] = [url]
    ws["tuning"]["output"] = {"image": f"{registry}/kaiflow/e2e-adapter:v1", "imagePushSecret": "regcred"}

    kubeconfig = box.service_account_kubeconfig("kaiflow-controller", "kaiflow-system")
    operator = start_controller(None, "--resync-s", "5", "--provider", "karpenter", "--allow-http-datasets",
                                "--dataset-allow-cidr", "127.0.0.0/8", "--insecure-registry", registry,
                                kubeconfig=kubeconfig)
    box.kubectl("apply", "-f", "-", input=yaml.safe_dump(ws))

    def probe(url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return f"{url}: {response.status}"
        except Exception as exc:  # what the story reports, whatever it is
            return f"{url}: {exc!r}"

    def story() -> str:
        address = runtime.services.addresses.get((tenant, name))
        probes = [probe("http://127.0.0.1:3000/readyz")] + ([probe(f"http://{address}:80/readyz")] if address else [])
        workspace = box.get("workspace.kaito.sh", name, tenant) or {}
        runs = box.list("workflows.argoproj.io", namespace=tenant)
        return (f"{operator.log()[-3000:]}\nagent errors: {argo_agent.errors}\nfinished: "
                f"{[(f['template'], f['exit_code'], f.get('message', '')[-500:]) for f in argo_agent.finished if f['namespace'] == tenant]}"
                f"\nprobes: {probes}\nworkspace: {json.dumps(workspace.get('status'))[:3000]}\nworkflow: "
                f"{json.dumps([r.get('status', {}).get('message') for r in runs])}\n{runtime.logs(2500)}")

    def finished() -> str | None:
        conditions = {c["type"]: c["status"] for c in
                      (box.get("workspace.kaito.sh", name, tenant) or {}).get("status", {}).get("conditions", [])}
        if conditions.get("WorkspaceSucceeded") == "True":
            return "succeeded"
        phases = [r.get("status", {}).get("phase") for r in box.list("workflows.argoproj.io", namespace=tenant)]
        failed_step = any(f["exit_code"] != 0 for f in argo_agent.finished if f["namespace"] == tenant)
        return "failed" if failed_step or {"Failed", "Error"} & set(phases) else None

    # Ends as soon as a step fails (no step of this run should need its retry), with the story.
    assert wait_until(finished, timeout=720, interval=2, what="the Workspace to succeed", detail=story) == "succeeded", story()

    # Every step ran for real, in the DAG's order, and ended with 0.
    ran = [f for f in argo_agent.finished if f["namespace"] == tenant]
    assert [f["template"] for f in ran] == ORDER, story()
    assert all(f["exit_code"] == 0 for f in ran), story()
    (workflow,) = box.list("workflows.argoproj.io", namespace=tenant)
    assert workflow["status"]["phase"] == "Succeeded"

    # The tune step really trained: its held-out loss fell (the loss report on the data volume).
    tune = next(f for f in ran if f["template"] == "tune")
    pvc_folder = next(run.volumes["kaiflow-data"] for run in runtime.pods.values() if "kaiflow-data" in run.volumes)
    (report,) = list(pvc_folder.glob("adapters/*/loss.json"))
    evaluations = [e["eval_loss"] for e in json.loads(report.read_text())["eval"]]
    assert len(evaluations) >= 2 and evaluations[-1] < evaluations[0], evaluations
    assert float(tune["outputs"]["eval-loss"]) == pytest.approx(evaluations[-1], rel=1e-3)

    # The adapter is in the registry, under the reference the run reported.
    image = next(f for f in ran if f["template"] == "push-adapter")["outputs"]["image"]
    assert image == f"{registry}/kaiflow/e2e-adapter:v1", image
    request = urllib.request.Request(f"http://{oci_registry_auth.host}/v2/kaiflow/e2e-adapter/manifests/v1", method="HEAD",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json",
                                              "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"].startswith("sha256:")

    # The chat service answers through its Service, with the tuned adapter loaded.
    service = runtime.services.addresses[(tenant, name)]
    with urllib.request.urlopen(f"http://{service}:80/v1/models", timeout=30) as response:
        models = json.loads(response.read())["data"]
    # merged (the default) lists the adapter on the one model; per-request serves it as its own id
    adapter = next(m["id"] for m in models
                   if m.get("root") == name or name in [a["name"] for a in m.get("adapters") or []])
    body = json.dumps({"model": adapter, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Where do fish live?"}]}).encode()
    chat = urllib.request.Request(f"http://{service}:80/v1/chat/completions", data=body, method="POST",
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(chat, timeout=120) as response:
        answer = json.loads(response.read())
    assert answer["model"] == adapter and answer["choices"][0]["message"]["role"] == "assistant", answer
    conditions = {c["type"]: c["status"] for c in box.get("workspace.kaito.sh", name, tenant)["status"]["conditions"]}
    assert conditions["InferenceReady"] == conditions["WorkspaceSucceeded"] == "True", conditions

    box.kubectl("delete", "workspace.kaito.sh", name, "-n", tenant, "--timeout=120s", timeout=150)
    wait_until(lambda: not box.list("nodeclaims.karpenter.sh", selector=f"kaito.sh/workspace={name}"), timeout=120,
               what="the Workspace's NodeClaims released", detail=story)
