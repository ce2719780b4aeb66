"""``kaiflow doctor [--kubeconfig FILE] [--namespace NS]``: is this cluster ready for kaiflow?

One line per check, ``ok``, ``warn`` or ``MISSING``, each problem with its fix (docs/install.md has
the commands in full). Exit 0 when nothing is missing, 1 when something is, 2 when the cluster
cannot be read at all. Read-only: it GETs and LISTs, and asks the API server's authorizer
(SelfSubjectAccessReview for the caller, SubjectAccessReview for kaiflow's ServiceAccounts) what
each identity may do; it creates and changes nothing.

What it checks:

* the Kubernetes version; kaiflow's Workspace CRD (and whether Kaito's Helm chart owns it), Argo's
  CRDs, Karpenter's NodeClaim CRD when the install provisions with Karpenter;
* Argo's workflow-controller (its Deployment and version; tested versions in
  ``ARGO_TESTED``) and whether an artifact repository is configured (logs and loss curves);
* the NVIDIA device plugin: GPU nodes that offer no ``nvidia.com/gpu``, or no plugin DaemonSet;
* kaiflow's controller Deployment and its image; the Workflow ServiceAccounts of the namespace and
  every right the install grants them (read from the install's own RBAC manifests);
* the Azure settings the aks provider reads (``kaiflow-azure``, the managed identity's client id,
  the workload identity webhook);
* Kaito beside kaiflow: its controller and validating webhook, and whether kaiflow runs ``--opt-in``;
* the default StorageClass's binding mode (zones).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from api.labels import CONTROLLER_COMPONENT, LABEL_INSTANCE_TYPE, LABEL_MANAGED_BY
from stepkit import kube
from stepkit.common import StepError

MANIFESTS = Path(__file__).resolve().parents[1] / "controller" / "manifests"
CONTROLLER_NAMESPACE = "kaiflow-system"
CONTROLLER_DEPLOYMENT = CONTROLLER_COMPONENT  # the Deployment and its ServiceAccount share the operator's name
AZURE_CONFIGMAP = "kaiflow-azure"
WORKSPACE_CRD = "workspaces.kaito.sh"
# kaiflow's generated CRD carries this annotation (api/crd.py); Kaito's does not.
KAIFLOW_CRD_MARK = "kaiflow.kaito.sh/generated-by"
ARGO_CRDS = ("workflows.argoproj.io", "cronworkflows.argoproj.io", "workflowtaskresults.argoproj.io",
             "workflowtemplates.argoproj.io")
KARPENTER_CRD = "nodeclaims.karpenter.sh"
# Argo versions the install and rendered Workflows are tested with (docs/install.md).
ARGO_TESTED = ("v3.7",)
ARGO_SUPPORTED = ("v3.6", "v3.7")
MIN_KUBERNETES = (1, 29)  # CRD CEL transition rules (the Workspace's immutable fields) are GA from 1.29
PLACEHOLDER = re.compile(r"^(0{8}-0{4}-0{4}-0{4}-0{12}|my-aks-.*|)$")
WORKLOAD_IDENTITY_CLIENT_ID = "azure.workload.identity/client-id"
HELM_RELEASE = "meta.helm.sh/release-name"
HELM_NAMESPACE = "meta.helm.sh/release-namespace"
GPU_RESOURCE = "nvidia.com/gpu"
# Labels AKS, Karpenter, Kaito's gpu-provisioner and NVIDIA's feature discovery put on GPU nodes.
GPU_NODE_LABELS = ("kubernetes.azure.com/accelerator", "nvidia.com/gpu.present", "nvidia.com/gpu.product",
                   "accelerator")


@dataclass(frozen=True)
class Finding:
    status: str  # ok | warn | missing
    what: str
    fix: str = ""

    def line(self) -> str:
        label = {"ok": "ok     ", "warn": "warn   ", "missing": "MISSING"}[self.status]
        return f"{label} {self.what}" + (f" — fix: {self.fix}" if self.fix else "")


def ok(what: str) -> Finding:
    return Finding("ok", what)


def warn(what: str, fix: str = "") -> Finding:
    return Finding("warn", what, fix)


def missing(what: str, fix: str) -> Finding:
    return Finding("missing", what, fix)


class Cluster:
    """The few reads the checks make, over stepkit.kube's client (raw paths, JSON answers)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return kube.request(self.client, method, path, body=body)

    def get(self, path: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.call("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def items(self, path: str) -> list[dict[str, Any]]:
        found = self.get(path)
        return (found or {}).get("items") or []


# -- the checks ---------------------------------------------------------------------------------


def check_kubernetes(c: Cluster) -> Iterable[Finding]:
    version = c.call("GET", "/version")
    major = int(re.sub(r"\D", "", version.get("major", "0")) or 0)
    minor = int(re.sub(r"\D", "", version.get("minor", "0")) or 0)
    text = version.get("gitVersion", f"v{major}.{minor}")
    if (major, minor) < MIN_KUBERNETES:
        yield missing(f"Kubernetes {text}: older than v{MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]} (CRD CEL rules)",
                      "upgrade the cluster (az aks upgrade)")
    else:
        yield ok(f"Kubernetes {text} (tested: v1.33)")


def _crd(c: Cluster, name: str) -> dict[str, Any] | None:
    return c.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")


def kaito_crd_owner(crd: dict[str, Any]) -> str | None:
    """The Helm release that owns the Workspace CRD (Kaito's chart), or None."""
    meta = crd.get("metadata") or {}
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    if annotations.get(HELM_RELEASE) or labels.get(LABEL_MANAGED_BY) == "Helm":
        release = annotations.get(HELM_RELEASE, "?")
        return f"{annotations.get(HELM_NAMESPACE, '?')}/{release}"
    return None


def check_crds(c: Cluster, provider: str) -> Iterable[Finding]:
    crd = _crd(c, WORKSPACE_CRD)
    apply_crd = "kubectl apply --server-side -f controller/manifests/kaito.sh_workspaces.yaml"
    if crd is None:
        yield missing(f"CRD {WORKSPACE_CRD}", apply_crd)
    else:
        owner = kaito_crd_owner(crd)
        ours = KAIFLOW_CRD_MARK in ((crd.get("metadata") or {}).get("annotations") or {})
        if owner and not ours:
            yield missing(f"CRD {WORKSPACE_CRD} is Kaito's (Helm release {owner}): it prunes kaiflow's fields "
                          "(tuning.schedule)",
                          "docs/install.md, 'Beside Kaito': take the CRD out of Helm's hands (helm upgrade "
                          "--skip-crds from now on), then " + apply_crd)
        elif owner and ours:
            yield warn(f"CRD {WORKSPACE_CRD} is kaiflow's but still labelled as Helm release {owner}: a "
                       "`helm upgrade` of Kaito without --skip-crds puts Kaito's back",
                       "upgrade Kaito with --skip-crds (docs/install.md, 'Beside Kaito')")
        elif not ours:
            yield missing(f"CRD {WORKSPACE_CRD} is not kaiflow's (no {KAIFLOW_CRD_MARK} annotation)", apply_crd)
        else:
            yield ok(f"CRD {WORKSPACE_CRD} (kaiflow's)")
    absent = [name for name in ARGO_CRDS if _crd(c, name) is None]
    for name in absent:
        yield missing(f"CRD {name} (Argo Workflows)", "install Argo Workflows (docs/install.md, step 1)")
    if not absent:
        yield ok("Argo Workflows CRDs")
    if _crd(c, KARPENTER_CRD) is None:
        if provider == "karpenter":
            yield missing(f"CRD {KARPENTER_CRD} (the karpenter provider makes NodeClaims)",
                          "install Karpenter v1 (or Kaito's gpu-provisioner), or run the controller with "
                          "KAIFLOW_CONTROLLER_PROVIDER=aks")
        else:
            yield ok(f"CRD {KARPENTER_CRD} absent: not needed by the {provider} provider")
    else:
        yield ok(f"CRD {KARPENTER_CRD} (Karpenter)")


def _deployments(c: Cluster) -> list[dict[str, Any]]:
    return c.items("/apis/apps/v1/deployments")


def _images(deployment: dict[str, Any]) -> list[str]:
    return [x.get("image", "") for x in deployment["spec"]["template"]["spec"].get("containers", [])]


def _ready(deployment: dict[str, Any]) -> str:
    status = deployment.get("status") or {}
    return f"{status.get('readyReplicas', 0)}/{deployment['spec'].get('replicas', 1)} ready"


def argo_version(image: str) -> str | None:
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    match = re.match(r"v?(\d+)\.(\d+)(\.\d+)?", tag)
    return f"v{match.group(1)}.{match.group(2)}{match.group(3) or ''}" if match else None


def check_argo(c: Cluster, deployments: list[dict[str, Any]]) -> Iterable[Finding]:
    found = [d for d in deployments if d["metadata"]["name"] == "workflow-controller"
             or any("argoproj/workflow-controller" in i for i in _images(d))]
    if not found:
        yield missing("Argo's workflow-controller Deployment",
                      "kubectl apply -n argo -f https://github.com/argoproj/argo-workflows/releases/download/"
                      "v3.7.9/install.yaml (docs/install.md, step 1)")
        return
    d = found[0]
    where = f"{d['metadata']['namespace']}/{d['metadata']['name']}"
    image = next((i for i in _images(d) if "workflow-controller" in i), _images(d)[0])
    version = argo_version(image)
    minor = ".".join((version or "").split(".")[:2])
    if version is None:
        yield warn(f"Argo workflow-controller {where} ({image}): version unknown from the image tag",
                   f"use a tagged release; tested: {', '.join(ARGO_TESTED)}")
    elif minor in ARGO_TESTED:
        yield ok(f"Argo workflow-controller {where} {version} ({_ready(d)})")
    elif minor in ARGO_SUPPORTED:
        yield ok(f"Argo workflow-controller {where} {version} ({_ready(d)}; supported, tested on "
                 f"{', '.join(ARGO_TESTED)})")
    elif minor < "v3.6" and minor.startswith("v3"):
        yield missing(f"Argo workflow-controller {version}: older than v3.6 (CronWorkflow schedules lists, "
                      "pod GC delays)", "upgrade Argo Workflows to v3.7")
    else:
        yield warn(f"Argo workflow-controller {version}: not tested with kaiflow (tested: "
                   f"{', '.join(ARGO_TESTED)})", "docs/install.md, 'Argo versions'")
    config = c.get(f"/api/v1/namespaces/{d['metadata']['namespace']}/configmaps/workflow-controller-configmap")
    data = (config or {}).get("data") or {}
    if "artifactRepository" in data:
        archive = "archiveLogs" in data["artifactRepository"]
        yield (ok if archive else lambda w: warn(w, "set artifactRepository.archiveLogs: true"))(
            "Argo artifact repository configured" + ("" if archive else " without archiveLogs"))
    else:
        yield warn("Argo has no artifact repository: the tune log and loss curve live in the pushed adapter "
                   "image only, and pod logs until pod GC",
                   "docs/install.md, 'Argo's artifact repository'")


def is_gpu_node(node: dict[str, Any]) -> bool:
    labels = node["metadata"].get("labels") or {}
    if any(k in labels for k in GPU_NODE_LABELS):
        return True
    sku = labels.get(LABEL_INSTANCE_TYPE, "")
    return bool(re.match(r"Standard_N[CDVG]", sku))


def check_device_plugin(c: Cluster) -> Iterable[Finding]:
    nodes = c.items("/api/v1/nodes")
    gpu_nodes = [n for n in nodes if is_gpu_node(n) or int(
        ((n.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0") or 0) > 0]
    daemonsets = c.items("/apis/apps/v1/daemonsets")
    plugins = [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in daemonsets
               if "nvidia-device-plugin" in d["metadata"]["name"]
               or any("k8s-device-plugin" in i or "gpu-operator" in i for i in _images(d))]
    without = [n["metadata"]["name"] for n in gpu_nodes
               if int(((n.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0") or 0) == 0]
    fix = ("kubectl apply -f https://raw.githubusercontent.com/NVIDIA/k8s-device-plugin/v0.17.1/deployments/"
           "static/nvidia-device-plugin.yml (or install NVIDIA's GPU operator; docs/install.md)")
    if without:
        yield missing(f"GPU nodes with no allocatable {GPU_RESOURCE}: {', '.join(sorted(without)[:5])} "
                      "(tune and serving pods would stay Pending)", fix)
    elif gpu_nodes:
        yield ok(f"{len(gpu_nodes)} GPU node(s) offer {GPU_RESOURCE}")
    if not plugins and not gpu_nodes:
        yield warn("no NVIDIA device plugin DaemonSet: GPU nodes provisioned later would offer no "
                   f"{GPU_RESOURCE}", fix)
    elif plugins:
        yield ok(f"NVIDIA device plugin: {', '.join(plugins)}")


def check_controller(c: Cluster, deployments: list[dict[str, Any]]) -> tuple[list[Finding], dict[str, Any] | None]:
    found = [d for d in deployments if d["metadata"]["name"] == CONTROLLER_DEPLOYMENT
             and d["metadata"]["namespace"] == CONTROLLER_NAMESPACE]
    if not found:
        return [missing(f"kaiflow's controller {CONTROLLER_NAMESPACE}/{CONTROLLER_DEPLOYMENT}",
                        "kubectl apply -k controller/manifests")], None
    d = found[0]
    return [ok(f"kaiflow controller {CONTROLLER_NAMESPACE}/{CONTROLLER_DEPLOYMENT} ({_ready(d)}, "
               f"{', '.join(_images(d))})")], d


def controller_settings(deployment: dict[str, Any] | None) -> dict[str, Any]:
    """Provider and --opt-in as the installed controller runs (its env and args)."""
    if deployment is None:
        return {"provider": "aks", "opt_in": False}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    args = [*container.get("command", []), *container.get("args", [])]
    provider = env.get("KAIFLOW_CONTROLLER_PROVIDER") or next(
        (a.split("=", 1)[1] for a in args if a.startswith("--provider=")), "aks")
    opt_in = "--opt-in" in args or env.get("KAIFLOW_CONTROLLER_OPT_IN", "").lower() in ("1", "true", "yes")
    return {"provider": provider, "opt_in": opt_in}


def install_rights(namespace: str) -> dict[tuple[str, str], list[tuple[str | None, str, str, str]]]:
    """(ServiceAccount namespace, name) -> [(namespace or None, group, resource, verb)] the install grants.

    Read from the install's own RBAC manifests, so the doctor checks exactly what
    ``kubectl apply -k controller/manifests`` (and its per-namespace overlay) grants.
    """
    docs = []  # (folder's namespace, document): system/ is kaiflow-system's, workflows/ the Workspaces'
    for folder, home in (("system", CONTROLLER_NAMESPACE), ("workflows", namespace)):
        docs += [(home, d) for d in yaml.safe_load_all((MANIFESTS / folder / "rbac.yaml").read_text()) if d]
    roles = {(d["kind"], d["metadata"]["name"]): d.get("rules", []) for _, d in docs
             if d["kind"] in ("Role", "ClusterRole")}
    rights: dict[tuple[str, str], list[tuple[str | None, str, str, str]]] = {}
    for home, binding in ((h, d) for h, d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref = binding["roleRef"]
        where = home if binding["kind"] == "RoleBinding" else None
        for subject in binding["subjects"]:
            if subject["kind"] != "ServiceAccount":
                continue
            # a ClusterRoleBinding of workflows/ names the kustomization's namespace (default): the
            # per-namespace overlay renames it, so it is the checked namespace's
            key = (home, subject["name"])
            for rule in roles[(ref["kind"], ref["name"])]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            rights.setdefault(key, []).append((where, group, resource, verb))
    return rights


def _review(c: Cluster, spec: dict[str, Any], kind: str) -> bool:
    answer = c.call("POST", f"/apis/authorization.k8s.io/v1/{kind.lower()}s",
                    {"apiVersion": "authorization.k8s.io/v1", "kind": kind, "spec": spec})
    return bool((answer.get("status") or {}).get("allowed"))


def _attributes(namespace: str | None, group: str, resource: str, verb: str) -> dict[str, str]:
    resource, _, subresource = resource.partition("/")
    attributes = {"group": group, "resource": resource, "verb": verb}
    if subresource:
        attributes["subresource"] = subresource
    if namespace:
        attributes["namespace"] = namespace
    return attributes


def check_service_accounts(c: Cluster, namespace: str) -> Iterable[Finding]:
    from kubernetes.client.exceptions import ApiException

    rights = install_rights(namespace)
    accounts = sorted(rights)
    present = []
    for sa_namespace, name in accounts:
        if c.get(f"/api/v1/namespaces/{sa_namespace}/serviceaccounts/{name}") is None:
            overlay = "kubectl apply -k controller/manifests" if sa_namespace in ("default", CONTROLLER_NAMESPACE) \
                else f"apply the per-namespace overlay for {sa_namespace} (docs/install.md)"
            yield missing(f"ServiceAccount {sa_namespace}/{name}", overlay)
        else:
            present.append((sa_namespace, name))
    try:
        can_review = _review(c, {"resourceAttributes": _attributes(None, "authorization.k8s.io",
                                                                   "subjectaccessreviews", "create")},
                             "SelfSubjectAccessReview")
    except ApiException as exc:
        can_review = False
        yield warn(f"cannot ask the authorizer (HTTP {exc.status})", "run the doctor as a cluster admin")
    if not can_review:
        yield warn("cannot check what kaiflow's ServiceAccounts may do: this user may not create "
                   "SubjectAccessReviews", "run the doctor as a cluster admin")
        return
    for sa_namespace, name in present:
        user = f"system:serviceaccount:{sa_namespace}:{name}"
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}", "system:authenticated"]
        denied = []
        for where, group, resource, verb in rights[(sa_namespace, name)]:
            spec = {"user": user, "groups": groups, "resourceAttributes": _attributes(where, group, resource, verb)}
            if not _review(c, spec, "SubjectAccessReview"):
                denied.append(f"{verb} {resource}{'.' + group if group else ''}"
                              + (f" in {where}" if where else ""))
        if denied:
            yield missing(f"ServiceAccount {sa_namespace}/{name} may not: {'; '.join(denied[:6])}"
                          + (f" (+{len(denied) - 6} more)" if len(denied) > 6 else ""),
                          "kubectl apply -k controller/manifests (or the namespace overlay) to restore its RBAC")
        else:
            yield ok(f"ServiceAccount {sa_namespace}/{name}: all {len(rights[(sa_namespace, name)])} rights "
                     "the install grants")


def check_azure(c: Cluster, namespace: str, provider: str) -> Iterable[Finding]:
    """The operator creates and releases agent pools (docs/security.md, "Nodes and tenancy"): the
    Azure settings and the identity are kaiflow-system's, never the Workspace namespace's."""
    if provider != "aks":
        yield ok(f"Azure settings not needed by the {provider} provider")
        return
    home = CONTROLLER_NAMESPACE
    config = c.get(f"/api/v1/namespaces/{home}/configmaps/{AZURE_CONFIGMAP}")
    if config is None:
        yield missing(f"ConfigMap {home}/{AZURE_CONFIGMAP} (the AKS cluster the operator adds pools to)",
                      "fill in controller/manifests/system/kaiflow-azure.yaml and apply the install")
    else:
        data = config.get("data") or {}
        unset = [k for k in ("subscriptionId", "resourceGroup", "clusterName") if PLACEHOLDER.match(data.get(k, ""))]
        if unset:
            yield missing(f"ConfigMap {home}/{AZURE_CONFIGMAP}: {', '.join(unset)} still the example value",
                          "az aks show -g RG -n CLUSTER --query id; set the three values (docs/install.md)")
        else:
            yield ok(f"ConfigMap {home}/{AZURE_CONFIGMAP}: cluster {data['resourceGroup']}/{data['clusterName']}")
    sa = c.get(f"/api/v1/namespaces/{home}/serviceaccounts/{CONTROLLER_DEPLOYMENT}")
    client_id = (((sa or {}).get("metadata") or {}).get("annotations") or {}).get(WORKLOAD_IDENTITY_CLIENT_ID, "")
    if sa is not None and PLACEHOLDER.match(client_id):
        yield missing(f"ServiceAccount {home}/{CONTROLLER_DEPLOYMENT}: no managed identity client id "
                      f"({WORKLOAD_IDENTITY_CLIENT_ID})",
                      "az identity create ...; az identity federated-credential create ... (docs/install.md, "
                      "'Workload identity'); annotate the ServiceAccount with its client id")
    elif sa is not None:
        yield ok(f"ServiceAccount {home}/{CONTROLLER_DEPLOYMENT}: managed identity {client_id}")
    webhooks = c.items("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations")
    if any("azure-wi" in w["metadata"]["name"] or "workload-identity" in w["metadata"]["name"] for w in webhooks):
        yield ok("Azure workload identity webhook")
    else:
        yield missing("Azure workload identity webhook (the operator gets no Azure token without it)",
                      "az aks update -g RG -n CLUSTER --enable-oidc-issuer --enable-workload-identity")


def check_kaito(c: Cluster, deployments: list[dict[str, Any]], opt_in: bool) -> Iterable[Finding]:
    kaito = [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in deployments
             if d["metadata"]["name"].startswith("kaito-workspace")
             or any("kaito/workspace" in i or "kaito-project" in i for i in _images(d))]
    webhooks = [w["metadata"]["name"] for w in
                c.items("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations")
                if any(any("kaito.sh" in g for r in (h.get("rules") or []) for g in r.get("apiGroups", []))
                       for h in w.get("webhooks") or [])]
    if not kaito and not webhooks:
        yield ok("Kaito not installed: kaiflow runs every Workspace")
        return
    if kaito:
        if opt_in:
            yield ok(f"Kaito's controller ({', '.join(kaito)}) beside kaiflow --opt-in")
        else:
            yield missing(f"Kaito's controller ({', '.join(kaito)}) runs, and kaiflow is not --opt-in: both "
                          "would act on every Workspace",
                          "add --opt-in to the kaiflow-controller Deployment's args and annotate kaiflow's "
                          "Workspaces kaiflow.kaito.sh/managed=true (docs/install.md, 'Beside Kaito')")
    if webhooks:
        yield warn(f"Kaito's validating webhook ({', '.join(webhooks)}) also checks kaiflow's Workspaces: it "
                   "ignores kaiflow-only fields but applies Kaito's own rules (e.g. its GPU memory figures)",
                   "docs/install.md, 'Beside Kaito': set instanceType explicitly")


def check_storage(c: Cluster) -> Iterable[Finding]:
    classes = c.items("/apis/storage.k8s.io/v1/storageclasses")
    default = [s for s in classes if ((s["metadata"].get("annotations") or {})
                                      .get("storageclass.kubernetes.io/is-default-class") == "true")]
    if not default:
        yield missing("no default StorageClass (each Workflow's data volume uses it)",
                      "mark one default (AKS: managed-csi)")
        return
    cls = default[0]
    mode = cls.get("volumeBindingMode", "Immediate")
    if mode == "WaitForFirstConsumer":
        yield ok(f"default StorageClass {cls['metadata']['name']}: WaitForFirstConsumer (the data volume is "
                 "made in the GPU node's zone)")
    else:
        yield warn(f"default StorageClass {cls['metadata']['name']}: {mode} binding: on a zonal cluster the data "
                   "volume may be made in a zone the GPU node is not in",
                   "make a WaitForFirstConsumer class the default (AKS's managed-csi is one; docs/install.md, "
                   "'Zones')")


def diagnose(client: Any, namespace: str = "default", provider: str | None = None) -> list[Finding]:
    c = Cluster(client)
    findings: list[Finding] = []
    findings += check_kubernetes(c)
    deployments = _deployments(c)
    controller_findings, controller = check_controller(c, deployments)
    settings = controller_settings(controller)
    provider = provider or settings["provider"]
    findings += check_crds(c, provider)
    findings += check_argo(c, deployments)
    findings += check_device_plugin(c)
    findings += controller_findings
    findings += check_service_accounts(c, namespace)
    findings += check_azure(c, namespace, provider)
    findings += check_kaito(c, deployments, settings["opt_in"])
    findings += check_storage(c)
    return findings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaiflow doctor", description="Check a cluster for what kaiflow needs: one line per check, each "
        "problem with its fix. Exit 0: nothing missing; 1: something is; 2: the cluster cannot be read.")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--namespace", "-n", default="default",
                        help="the namespace Workspaces run in: its ServiceAccounts and kaiflow-azure are checked")
    parser.add_argument("--provider", choices=("aks", "karpenter", "existing"),
                        help="node provider to check for (default: what the installed controller uses)")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = kube.api_client(args.kubeconfig)
        findings = diagnose(client, args.namespace, args.provider)
    except StepError as exc:
        out(f"error: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - an unreachable or refusing API server: one line, not a traceback
        status = getattr(exc, "status", None)
        out(f"error: cannot read the cluster: {f'HTTP {status} {exc.reason}' if status else exc}")
        return 2
    if args.output == "json":
        out(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for finding in findings:
            out(finding.line())
        problems = sum(f.status == "missing" for f in findings)
        out(f"{problems} missing, {sum(f.status == 'warn' for f in findings)} warning(s)")
    return 1 if any(f.status == "missing" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
