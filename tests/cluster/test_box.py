"""The cluster box itself: a real API server that enforces RBAC, schedules onto kwok's GPU nodes,
and Argo's own controller running a Workflow to the end through the node agent."""

from __future__ import annotations

import json

from tests.fixtures.argo_agent import Outcome
from tests.fixtures.cluster import GPU_TAINT, wait_until


def test_the_api_server_enforces_rbac(cluster_box, box_namespace):
    cluster_box.kubectl("create", "serviceaccount", "nobody", "-n", box_namespace)
    who = f"system:serviceaccount:{box_namespace}:nobody"
    refused = cluster_box.kubectl("get", "pods", "-n", box_namespace, as_user=who, check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr
    kubeconfig = cluster_box.service_account_kubeconfig("nobody", box_namespace)
    whoami = cluster_box.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == who


def test_a_pod_lands_on_a_gpu_node_only_with_the_toleration_and_kwok_runs_it(cluster_box, box_namespace):
    node = f"gpu-{box_namespace}"
    cluster_box.add_node(node, gpus=2, labels={"kaiflow.kaito.sh/test-node": box_namespace}, taints=[GPU_TAINT])
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": box_namespace},
        "spec": {"nodeSelector": {"kaiflow.kaito.sh/test-node": box_namespace},
                 "containers": [{"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
    }
    cluster_box.kubectl("create", "-f", "-", input=json.dumps(pod))
    unschedulable = wait_until(
        lambda: any(c.get("reason") == "Unschedulable"
                    for c in (cluster_box.get("pod", "p", box_namespace) or {}).get("status", {}).get("conditions", [])),
        timeout=60, what="the scheduler to refuse the untolerated taint")
    assert unschedulable
    cluster_box.kubectl("delete", "pod", "p", "-n", box_namespace, "--wait=false")
    pod["metadata"]["name"] = "q"
    pod["spec"]["tolerations"] = [{"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    cluster_box.kubectl("create", "-f", "-", input=json.dumps(pod))
    running = wait_until(lambda: (cluster_box.get("pod", "q", box_namespace) or {}).get("status", {}).get("phase") == "Running",
                         timeout=60, what="pod q Running on the GPU node")
    assert running and cluster_box.get("pod", "q", box_namespace)["spec"]["nodeName"] == node


def test_argo_runs_a_dag_in_order_retries_a_failed_step_and_runs_the_exit_handler(cluster_box, box_namespace, argo_agent):
    node = f"cpu-{box_namespace}"
    cluster_box.add_node(node, gpus=0, labels={"kaiflow.kaito.sh/test-node": box_namespace})
    cluster_box.kubectl("create", "serviceaccount", "runner", "-n", box_namespace)
    cluster_box.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "executor", "namespace": box_namespace},
        "rules": [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]}, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "executor", "namespace": box_namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "executor"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": box_namespace}]})
    argo_agent.script(box_namespace, "b", Outcome(exit_code=1, message="first try fails"), Outcome(outputs={"answer": "42"}))
    step = {"image": "busybox", "command": ["true"]}
    workflow = {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "dag", "namespace": box_namespace},
        "spec": {"entrypoint": "main", "serviceAccountName": "runner", "onExit": "bye", "activeDeadlineSeconds": 600,
                 "nodeSelector": {"kaiflow.kaito.sh/test-node": box_namespace},
                 "templates": [
                     {"name": "main", "dag": {"tasks": [{"name": "a", "template": "a"},
                                                        {"name": "b", "template": "b", "dependencies": ["a"]}]}},
                     {"name": "a", "container": step},
                     {"name": "bye", "container": step},
                     {"name": "b", "container": step, "retryStrategy": {"limit": 2},
                      "outputs": {"parameters": [{"name": "answer", "valueFrom": {"path": "/tmp/answer"}}]}},
                 ]}}
    cluster_box.apply(workflow)
    done = wait_until(lambda: (cluster_box.get("workflow", "dag", box_namespace) or {}).get("status", {}).get("phase")
                      in ("Succeeded", "Failed", "Error"), timeout=120, what="Workflow dag to finish",
                      detail=lambda: "\n".join(argo_agent.errors) + cluster_box.log_tails())
    status = cluster_box.get("workflow", "dag", box_namespace)["status"]
    assert done and status["phase"] == "Succeeded", status
    order = [f["template"] for f in argo_agent.finished if f["namespace"] == box_namespace]
    assert order == ["a", "b", "b", "bye"]
    outputs = [n["outputs"]["parameters"][0]["value"] for n in status["nodes"].values()
               if n.get("templateName") == "b" and n["type"] == "Retry"]
    assert outputs == ["42"]
