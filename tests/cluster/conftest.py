"""What the cluster-box tests share: kaiflow's install applied once, tenant namespaces made with the
overlay docs/install.md gives, and steps run as a ServiceAccount of the box."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
_tenants = count(1)

OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {namespace}
resources:
  - {base}
patches:
  - target: {{kind: ClusterRoleBinding, name: kaiflow-provisioner-default}}
    patch: |-
      - op: replace
        path: /metadata/name
        value: kaiflow-provisioner-{namespace}
"""


def namespace_overlay(folder: Path, namespace: str) -> Path:
    """The overlay docs/install.md gives for Workspaces in another namespace."""
    folder.mkdir(parents=True)
    base = os.path.relpath(ROOT / "controller" / "manifests" / "workflows", folder)
    (folder / "kustomization.yaml").write_text(OVERLAY.format(namespace=namespace, base=base))
    return folder


def workspace_file(example: str, namespace: str, name: str | None = None) -> dict:
    """The Workspace of an example file, moved to ``namespace`` (and renamed)."""
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if d]
    ws = next(d for d in docs if d["kind"] == "Workspace")
    ws["metadata"]["namespace"] = namespace
    if name:
        ws["metadata"]["name"] = name
    return ws


def run_step(module: str, *args: str, kubeconfig: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m <module> ...`` with the kubeconfig of a ServiceAccount (as the step's pod would be)."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def installed(cluster_box):
    """The box with kaiflow installed as docs/install.md says: the CRD on its own, then the rest."""
    cluster_box.kubectl("apply", "--server-side", "-f", str(ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml"))
    cluster_box.kubectl("apply", "-k", str(ROOT / "controller" / "manifests"))
    cluster_box.kubectl("wait", "--for=condition=Established", "crd/workspaces.kaito.sh", "--timeout=60s")
    return cluster_box


@pytest.fixture
def tenant(installed, tmp_path) -> Iterator[str]:
    """A namespace with the Workflow identities installed by the per-namespace overlay."""
    namespace = f"tenant-{next(_tenants)}"
    installed.kubectl("create", "namespace", namespace)
    installed.kubectl("apply", "-k", str(namespace_overlay(tmp_path / f"overlay-{namespace}", namespace)))
    yield namespace
    installed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    installed.kubectl("delete", "clusterrolebinding", f"kaiflow-provisioner-{namespace}", check=False)


def phi3_gpu_node(cluster_box, name: str) -> Iterator[str]:
    """A GPU node for the phi-3 example's tune pod (labelSelector app=phi-3-adapter), for a module's
    ``gpu_node`` fixture; deleted after, since other modules check where their pods land."""
    from tests.fixtures.cluster import GPU_TAINT

    if cluster_box.get("node", name) is None:
        cluster_box.add_node(name, gpus=1, labels={"app": "phi-3-adapter", "apps": "phi-3",
                                                   "node.kubernetes.io/instance-type": "Standard_NC6s_v3"},
                             taints=[GPU_TAINT, {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
    yield name
    cluster_box.kubectl("delete", "node", name, "--wait=false", check=False)
