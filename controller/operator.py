"""The kopf handlers: compare what ``controller.decide`` wants with the cluster, apply, report.

Design
------
* One reconcile per Workspace event (create, update, resume after a restart, and a periodic
  timer as a safety net): validate, check immutable fields against the pipeline made for the last
  accepted generation, create that generation's Workflow (or apply the CronWorkflow), stop what
  an older generation left running, refresh the status. Every step is idempotent, so a replayed
  event, a restart in the middle or a second replica converge on the same objects.
* Status follows the Argo objects: events on kaiflow's Workflows, on the Workspace's Deployment
  and its pods trigger a refresh of that Workspace (``controller.status.observe``); the timer
  catches anything missed while the API server was away.
* Every write goes through ``stepkit.kube`` (one client, one error policy, server-side apply as
  field manager ``kaiflow``), the Workspace status included: a status refresh is triggered by
  events on *other* objects, where kopf's patch object for the Workspace does not exist. kopf
  keeps only its own bookkeeping (annotations prefixed ``kaiflow.kaito.sh``, the finalizer).
* Deletion: the finalizer releases the nodes the provision task made (``steps.provision.release``)
  and the CronWorkflow, retrying until ``--delete-deadline-s`` after the deletion started; then it
  lets go with a Warning event, so a failed or never-provisioned Workspace never hangs (Kaito #932).
* Kaito #1107: when a Workflow fails and nothing serves from its nodes, they are released at once.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from api.labels import (
    ANNOTATION_IMMUTABLE,
    ANNOTATION_OPT_IN,
    ANNOTATION_OWNER,
    CONTROLLER_COMPONENT,
    FIELD_MANAGER,
    FINALIZER,
    KAIFLOW_PREFIX,
    LABEL_CRON_WORKFLOW,
    LABEL_GENERATION,
    LABEL_MANAGED_BY,
    LABEL_PIPELINE,
    LABEL_WORKSPACE,
    MANAGED_BY,
    owner_annotation,
)
from api.workspace_status import (
    REASON_DELETING,
    REASON_PROVISION_FAILED,
    REASON_NAME_TAKEN,
    REASON_RELEASE_TIMEOUT,
    WORKSPACE_DELETING,
    now,
    set_condition,
)
from api.workspace_types import GROUP, KIND, STORAGE_VERSION
from controller.decide import ARGO_API_VERSION, Desired, Refused, RunPlan, decide, plan_run, run_record
from controller.nodes import provision_args
from controller.options import ControllerOptions
from controller.status import (DONE_PHASES, FAILED_PHASES, Observed, Transition, failure_exit_code, observe, refused,
                               task_output)
from pipelines.names import OUTPUT_PROVIDER, TASK_PROVISION
from pipelines.tasks import DATASET_URLS_VOLUME
from stepkit.common import RetryableError, StepError
from stepkit.kube import (api_client, api_error, delete, get, is_unreachable, request, resource_path, server_side_apply,
                          unreachable_error)
from steps.provision.release import release as release_nodes
from steps.provision.release import request as request_nodes

log = logging.getLogger("kaiflow.controller")
# Server-side label selectors of the operator's watches besides the Workspaces: kaiflow's Workflows
# and Deployments, and the serving pods of its Deployments (not the pipeline's own pods).
WATCH_SELECTORS: dict[tuple[str, str, str], str] = {
    ("argoproj.io", "v1alpha1", "workflows"): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ("apps", "v1", "deployments"): f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ("", "v1", "pods"): f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_WORKSPACE},!{LABEL_PIPELINE}",
}
PLURAL = "workspaces"
# Writes that record a field manager: the operator's are all "kaiflow" (without it the API server
# names the client's User-Agent, "OpenAPI-Generator", in managedFields and in conflict messages).
WRITES = ("POST", "PUT", "PATCH")
RETRY_DELAY_S = 5.0


class Operator:
    """The controller's state: options, one API client per thread, one lock per Workspace."""

    def __init__(self, options: ControllerOptions) -> None:
        self.options = options
        self._local = threading.local()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._pending: dict[tuple[str, str], int] = defaultdict(int)
        self._refreshing: set[tuple[str, str]] = set()
        self._queue_lock = threading.Lock()
        self._request_errors: dict[tuple[str, str], str] = {}  # the last node-request failure reported

    # -- API access (stepkit.kube) ---------------------------------------------------------------

    @property
    def client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = api_client(self.options.kubeconfig)
        return client

    def _request(self, method: str, path: str, body: Any = None, *, query: list[tuple[str, str]] | None = None,
                 content_type: str = "application/json", what: str = "") -> Any:
        if method in WRITES:
            query = _managed(query)
        try:
            return request(self.client, method, path, body=body, query=query, content_type=content_type)
        except ApiException as exc:
            raise api_error(exc, what or f"{method} {path}") from None
        except Exception as exc:
            if is_unreachable(exc):
                raise kopf.TemporaryError(str(unreachable_error(exc, what or path)), delay=RETRY_DELAY_S) from None
            raise

    def _list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        answer = self._request("GET", resource_path(api_version, kind, namespace=namespace),
                               query=[("labelSelector", selector)], what=f"listing {kind}s in {namespace}")
        items = answer.get("items") or []
        for item in items:
            item.setdefault("kind", kind)
        return items

    def _get(self, api_version: str, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        return get(self.client, api_version, kind, name, namespace)

    def workspace(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"{GROUP}/{STORAGE_VERSION}", KIND, name, namespace)

    def wanted(self, body: dict[str, Any]) -> bool:
        if not self.options.opt_in:
            return True
        return ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_OPT_IN) == "true"

    # -- reconcile ------------------------------------------------------------------------------

    def pipelines(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """kaiflow's Workflows and CronWorkflows of a Workspace (CronWorkflow runs excluded)."""
        selector = f"{LABEL_WORKSPACE}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"
        found = [w for w in self._list(ARGO_API_VERSION, "Workflow", namespace, selector)
                 if LABEL_CRON_WORKFLOW not in (w["metadata"].get("labels") or {})]
        return found + self._list(ARGO_API_VERSION, "CronWorkflow", namespace, selector)

    @staticmethod
    def accepted(pipelines: list[dict[str, Any]], generation: int) -> dict[str, Any] | None:
        """Immutable fields recorded on the newest pipeline made for an earlier generation."""

        older = [p for p in pipelines if _generation(p) is not None and _generation(p) < generation]
        if not older:
            return None
        newest = max(older, key=lambda p: _generation(p) or 0)
        raw = (newest["metadata"].get("annotations") or {}).get(ANNOTATION_IMMUTABLE)
        return json.loads(raw) if raw else None

    def reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        if meta.get("deletionTimestamp") or not self.wanted(body):
            return
        with self._locks[(namespace, name)]:
            # kopf's copy may predate a status refresh that ran meanwhile: read the current one.
            body = self.workspace(namespace, name) or body
            meta = body["metadata"]
            if meta.get("deletionTimestamp"):
                return
            generation = int(meta.get("generation") or 1)
            plan = plan_run(body, generation, time.time())
            # A first run of a first generation has no predecessor to compare with or stop: skip the
            # listing (the create below adopts an object of the same name), which costs most with
            # many objects.
            existing = self.pipelines(namespace, name) if generation > 1 or plan.run > 1 else []
            current = [p for p in existing if _generation(p) == generation]
            accepted = None if current else self.accepted(existing, generation)
            verdict = decide(body, self.options, accepted, plan.run)
            if isinstance(verdict, Refused):
                self._write_status(body, refused(body.get("status"), verdict.reason, verdict.message, generation))
                return
            # A generation's Workflow is made once (plan_run): one that Argo's TTL deleted is not
            # made again; a CronWorkflow is applied every time (in place, idempotent).
            if verdict.kind == "CronWorkflow" or (plan.create and not any(
                    p["metadata"]["name"] == verdict.name for p in current)):
                if plan.why in ("rerun", "retry"):
                    log.info("%s of Workspace %s/%s: run %d (%s)", plan.why, namespace, name, plan.run, verdict.name)
                try:
                    self.ensure(verdict, meta.get("uid"))
                except NameTaken as exc:
                    self._write_status(body, refused(body.get("status"), REASON_NAME_TAKEN, str(exc), generation))
                    return
            self.supersede(existing, verdict)
            self._refresh_locked(body, verdict, plan)

    def ensure(self, desired: Desired, uid: str | None) -> dict[str, Any]:
        """Create this generation's object, or adopt the one already there (a replay, a restart)."""

        if desired.secret is not None:
            desired = self.apply_secret(desired, uid)
        if desired.kind == "CronWorkflow":
            existing = self._get(ARGO_API_VERSION, "CronWorkflow", desired.name, desired.namespace)
            if existing is not None and self._claim(existing, desired, uid) == "earlier":
                delete(self.client, ARGO_API_VERSION, "CronWorkflow", desired.name, desired.namespace)
            return server_side_apply(self.client, desired.manifest)
        path = resource_path(ARGO_API_VERSION, "Workflow", namespace=desired.namespace)

        try:
            created = request(self.client, "POST", path, body=desired.manifest, query=_managed(None))
            log.info("created Workflow %s/%s", desired.namespace, desired.name)
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise api_error(exc, f"creating Workflow {desired.namespace}/{desired.name}") from None
        existing = self._get(ARGO_API_VERSION, "Workflow", desired.name, desired.namespace) or {}
        if existing and self._claim(existing, desired, uid) == "earlier":
            # Left by an earlier Workspace of the same name, waiting for garbage collection.
            delete(self.client, ARGO_API_VERSION, "Workflow", desired.name, desired.namespace)
            raise kopf.TemporaryError(f"Workflow {desired.name} belonged to an earlier Workspace; deleted it, retrying",
                                      delay=1)
        return existing

    def apply_secret(self, desired: Desired, uid: str | None) -> Desired:
        """Create the Secret of signed dataset URLs and point the pipeline's volume at it.

        The operator may create Secrets but never read one (RBAC): each run gets a new Secret
        (``generateName``, owned by the Workspace), so nothing is overwritten or read back. A
        CronWorkflow of this generation keeps the Secret it already names (the URLs are the same).
        """
        secret = dict(desired.secret or {})
        name = None
        if desired.kind == "CronWorkflow":
            existing = self._get(ARGO_API_VERSION, "CronWorkflow", desired.name, desired.namespace)
            owners = {o.get("uid") for o in ((existing or {}).get("metadata") or {}).get("ownerReferences") or []}
            if existing is not None and _generation(existing) == desired.generation and uid in owners:
                name = _urls_secret_of(existing)
        if name is None:
            created = self._request("POST", resource_path("v1", "Secret", namespace=desired.namespace), secret,
                                    what=f"creating the dataset URLs Secret of {desired.name}")
            name = created["metadata"]["name"]
        manifest = copy.deepcopy(desired.manifest)
        spec = manifest["spec"]["workflowSpec"] if desired.kind == "CronWorkflow" else manifest["spec"]
        for volume in spec.get("volumes") or []:
            if volume.get("name") == DATASET_URLS_VOLUME:
                volume["secret"]["secretName"] = name
        return dataclasses.replace(desired, manifest=manifest)

    @staticmethod
    def _claim(existing: dict[str, Any], desired: Desired, uid: str | None) -> str:
        """``ours``, ``earlier`` (an earlier Workspace of this name made it) or raise ``NameTaken``.

        Nothing kaiflow did not make for a Workspace of this name is overwritten or deleted: a
        same-named Workflow or CronWorkflow of another tool or user in the namespace is left alone
        and the Workspace is refused, naming it.
        """
        kind = existing.get("kind") or desired.kind
        if owner_of(existing, desired.namespace, desired.manifest["metadata"]["labels"][LABEL_WORKSPACE]) != "kaiflow":
            raise NameTaken(f"{kind} {desired.namespace}/{desired.name} exists and was not made by kaiflow for this "
                            f"Workspace; kaiflow neither overwrites nor deletes it: rename or delete it")
        owners = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or []}
        return "earlier" if uid and owners and uid not in owners else "ours"

    def supersede(self, existing: list[dict[str, Any]], desired: Desired) -> None:
        """An older generation's CronWorkflow goes; its running Workflow is stopped (Argo's shutdown)."""

        for obj in existing:
            if obj["metadata"]["name"] == desired.name:
                continue
            if _generation(obj) == desired.generation and obj.get("kind") == "CronWorkflow":
                continue
            meta = obj["metadata"]
            if owner_of(obj, meta["namespace"], desired.manifest["metadata"]["labels"][LABEL_WORKSPACE]) != "kaiflow":
                continue  # a label alone does not make it ours
            if obj.get("kind") == "CronWorkflow":
                delete(self.client, ARGO_API_VERSION, "CronWorkflow", meta["name"], meta["namespace"])
            elif ((obj.get("status") or {}).get("phase") not in DONE_PHASES
                  and (obj.get("spec") or {}).get("shutdown") != "Terminate"):
                self._request("PATCH", resource_path(ARGO_API_VERSION, "Workflow", meta["name"], meta["namespace"]),
                              {"spec": {"shutdown": "Terminate"}}, content_type="application/merge-patch+json",
                              what=f"stopping superseded Workflow {meta['name']}")

    # -- status -----------------------------------------------------------------------------------

    def request_refresh(self, namespace: str, name: str) -> None:
        """Refresh soon; a burst of events (a Workflow patched task by task) collapses into one or two."""
        key = (namespace, name)
        with self._queue_lock:
            self._pending[key] += 1
            if key in self._refreshing:
                return  # the thread refreshing it now will go round once more
            self._refreshing.add(key)
        try:
            while True:
                with self._queue_lock:
                    if not self._pending[key]:
                        self._pending.pop(key, None)
                        return
                    self._pending[key] = 0
                self.refresh(namespace, name)
        finally:
            with self._queue_lock:
                self._refreshing.discard(key)

    def refresh(self, namespace: str, name: str) -> None:
        """Recompute a Workspace's status from its pipeline, Deployment and pods."""
        with self._locks[(namespace, name)]:
            body = self.workspace(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp") or not self.wanted(body):
                return
            plan = plan_run(body, int(body["metadata"].get("generation") or 1), time.time())
            verdict = decide(body, self.options, None, plan.run)
            if isinstance(verdict, Desired):
                self._refresh_locked(body, verdict, plan)

    def _refresh_locked(self, body: dict[str, Any], desired: Desired, plan: RunPlan) -> None:
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        pipeline = self._get(ARGO_API_VERSION, desired.kind, desired.name, namespace)
        if pipeline is None:
            return
        pipeline.setdefault("kind", desired.kind)
        run = pipeline
        if desired.kind == "CronWorkflow":
            runs = self._list(ARGO_API_VERSION, "Workflow", namespace, f"{LABEL_CRON_WORKFLOW}={desired.name}")
            run = max(runs, key=lambda w: (w["metadata"].get("creationTimestamp") or "", w["metadata"]["name"])) if runs else None
        deployment = self._get("apps/v1", "Deployment", name, namespace)
        if deployment is not None and (deployment["metadata"].get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
            deployment = None
        pods: list[dict[str, Any]] = []
        if deployment is not None:
            selector = ",".join(f"{k}={v}" for k, v in
                                (((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}).items())
            answer = self._request("GET", resource_path("v1", "Pod", namespace=namespace),
                                   query=[("labelSelector", selector)] if selector else None, what="listing pods")
            pods = [p for p in answer.get("items") or [] if LABEL_PIPELINE not in (p["metadata"].get("labels") or {})]
        self._keep_nodes_requested(body, desired, run)
        released = self._release_after_failure(body, run, deployment)
        observed = observe(body.get("status"), generation=desired.generation, is_tuning=desired.is_tuning,
                           target_node_count=desired.target_node_count, pipeline=pipeline, run=run,
                           deployment=deployment, pods=pods, nodes_released=released)
        if desired.kind == "Workflow" and "pipeline" in observed.status:
            observed.status["pipeline"].update(run_record(
                plan, self.options, observed.status["pipeline"].get("lastRun"), failure_exit_code(run), time.time()))
        self._write_status(body, observed)

    def _release_after_failure(self, body: dict[str, Any], run: dict[str, Any] | None,
                               deployment: dict[str, Any] | None) -> bool | None:
        """Kaito #1107: a failed run's nodes are freed at once, unless a Deployment serves from them."""
        if run is None or (run.get("status") or {}).get("phase") not in FAILED_PHASES:
            return None
        last = (((body.get("status") or {}).get("pipeline") or {}).get("lastRun") or {})
        if last.get("name") == run["metadata"]["name"] and last.get("nodesReleased"):
            return True
        if not self.options.release_after_failure or deployment is not None:
            return False

        provider = task_output(run, TASK_PROVISION, OUTPUT_PROVIDER) or self.options.provider
        meta = body["metadata"]
        try:
            self.release(provider, meta["name"], meta.get("namespace") or "default", timeout=30)
        except Exception as exc:  # reported, retried at the next refresh
            log.warning("releasing the nodes of %s failed: %s", meta["name"], exc)
            return False
        self.event(body, Transition("ResourceReady", "False", "NodesReleased",
                                    f"the Workflow failed; released the nodes ({provider or 'default'} provider)"))
        return True

    def _write_status(self, body: dict[str, Any], observed: Observed) -> None:
        if observed.status == (body.get("status") or {}):
            return
        meta = body["metadata"]
        path = resource_path(f"{GROUP}/{body['apiVersion'].split('/')[-1]}", KIND, meta["name"], meta.get("namespace")) + "/status"
        # A merge patch keeps keys it does not name: name the ones that went (a retry's nextRetryAt).
        patch = _merge_patch(body.get("status") or {}, observed.status)
        self._request("PATCH", path, {"status": patch}, content_type="application/merge-patch+json",
                      what=f"updating the status of Workspace {meta['name']}")
        body["status"] = observed.status
        for transition in observed.transitions:
            self.event(body, transition)

    def event(self, body: dict[str, Any], transition: Transition) -> None:
        """A Kubernetes Event on the Workspace (``kubectl describe wks`` lists them)."""

        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        stamp = now()
        message = f"{transition.type}={transition.status}" + (f": {transition.message}" if transition.message else "")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": KIND, "name": meta["name"],
                               "namespace": namespace, "uid": meta.get("uid")},
            "reason": transition.reason or transition.type, "message": message[:1024],
            "type": "Warning" if transition.warning else "Normal",
            "source": {"component": CONTROLLER_COMPONENT}, "reportingComponent": CONTROLLER_COMPONENT,
            "reportingInstance": CONTROLLER_COMPONENT,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self._request("POST", resource_path("v1", "Event", namespace=namespace), event, what="posting an Event")
        except Exception as exc:  # an Event is a courtesy: never fail a reconcile over it
            log.warning("could not post an Event for %s: %s", meta["name"], exc)

    # -- deletion ---------------------------------------------------------------------------------

    def release(self, provider: str | None, name: str, namespace: str, *, timeout: float) -> list[str]:
        return release_nodes(provider or "aks", name, namespace, kubeconfig=self.options.kubeconfig, timeout=timeout)

    def _keep_nodes_requested(self, body: dict[str, Any], desired: Desired, run: dict[str, Any] | None) -> None:
        """While a run waits in provision-nodes, its nodes are requested (idempotent: a claim that
        failed to launch is made afresh, a pool released after a failed run is asked for again).
        A failure is a Warning Event (once per message) and is tried again at the next refresh."""
        if run is None or (run.get("status") or {}).get("phase") in DONE_PHASES:
            return
        if task_output(run, TASK_PROVISION, OUTPUT_PROVIDER):
            return  # provision-nodes is done: its nodes are there
        key = (desired.namespace, body["metadata"]["name"])
        try:
            self.request_nodes(desired)
            self._request_errors.pop(key, None)
        except Exception as exc:  # reported; the next refresh (events, --resync-s) tries again
            log.warning("requesting the nodes of %s/%s failed: %s", *key, exc)
            if self._request_errors.get(key) != str(exc):
                self._request_errors[key] = str(exc)
                self.event(body, Transition("ResourceReady", "False", REASON_PROVISION_FAILED,
                                            f"the operator could not request the nodes: {exc}"))

    def request_nodes(self, desired: Desired) -> list[str]:
        """Create the nodes the pipeline's provision-nodes task will wait for (controller/nodes.py):
        the operator holds the right to create them, tenant namespaces do not. Idempotent."""
        args = provision_args(desired.manifest)
        if args is None:
            return []
        requested = request_nodes(args, kubeconfig=self.options.kubeconfig)
        log.info("requested %s for %s/%s", ", ".join(requested) or "no new nodes", desired.namespace, desired.name)
        return requested

    def finalize(self, body: dict[str, Any]) -> None:
        """Release what owner references cannot, within the deadline; raise TemporaryError to retry."""

        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        started = _parse_time(meta.get("deletionTimestamp")) or time.time()
        remaining = started + self.options.delete_deadline_s - time.time()
        status = body.get("status") or {}
        if not any(c.get("type") == WORKSPACE_DELETING for c in status.get("conditions") or []):
            conditions = set_condition(status.get("conditions"), WORKSPACE_DELETING, True, REASON_DELETING,
                                       "releasing nodes and the schedule")
            try:
                self._write_status(body, Observed({**status, "conditions": conditions}, [
                    Transition(WORKSPACE_DELETING, "True", REASON_DELETING, "releasing nodes and the schedule")]))
            except Exception as exc:  # the deletion goes on; the condition is a courtesy
                log.warning("could not mark %s as deleting: %s", name, exc)
        status = body.get("status") or status
        try:
            # Owner references would take these too; deleting them here makes it immediate and
            # holds when the Workspace is deleted with --cascade=orphan.
            selector = f"{LABEL_WORKSPACE}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"
            for kind in ("CronWorkflow", "Workflow"):
                for obj in self._list(ARGO_API_VERSION, kind, namespace, selector):
                    if owner_of(obj, namespace, name) != "kaiflow":
                        continue  # a label alone does not make it ours
                    delete(self.client, ARGO_API_VERSION, kind, obj["metadata"]["name"], namespace)
            provider = ((status.get("pipeline") or {}).get("provider")) or self.options.provider
            budget = max(1.0, min(remaining, 60.0))
            released = _within(budget, lambda: self.release(provider, name, namespace, timeout=budget))
            if released:
                log.info("released %s for Workspace %s/%s", ", ".join(released), namespace, name)
        except Exception as exc:
            if time.time() < started + self.options.delete_deadline_s:
                raise kopf.TemporaryError(f"releasing the resources of {name}: {exc}", delay=RETRY_DELAY_S) from None
            self.event(body, Transition(WORKSPACE_DELETING, "True", REASON_RELEASE_TIMEOUT,
                                        f"gave up releasing after {self.options.delete_deadline_s:.0f} s: {exc}; "
                                        f"check for leftover nodes labelled {LABEL_WORKSPACE}={name}"))


class NameTaken(Exception):
    """The pipeline's name is held by an object kaiflow did not make for this Workspace."""


def owner_of(obj: dict[str, Any], namespace: str, workspace: str) -> str:
    """``kaiflow`` when ``obj`` carries every mark kaiflow puts on a Workspace's pipeline, else ``foreign``.

    The marks: kaiflow's managed-by label, the Workspace label and owner annotation, and owner
    references (if any) only to Workspaces of that name.
    """
    meta = obj.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    refs = meta.get("ownerReferences") or []
    if (labels.get(LABEL_MANAGED_BY) == MANAGED_BY and labels.get(LABEL_WORKSPACE) == workspace
            and annotations.get(ANNOTATION_OWNER) == owner_annotation(namespace, workspace)
            and all(r.get("kind") == KIND and r.get("name") == workspace for r in refs)):
        return "kaiflow"
    return "foreign"


def _within(seconds: float, call: Any) -> Any:
    """``call()``, or TimeoutError after ``seconds``: a release stuck in a cloud API's retries must
    not hold the deletion past its deadline (the call finishes, or fails, in the background)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="kaiflow-release", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            nested = _merge_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif key not in old or old[key] != value:
            patch[key] = value
    return patch


def _managed(query: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    query = list(query or [])
    return query if any(key == "fieldManager" for key, _ in query) else [*query, ("fieldManager", FIELD_MANAGER)]


def _urls_secret_of(obj: dict[str, Any]) -> str | None:
    spec = (obj.get("spec") or {}).get("workflowSpec") or obj.get("spec") or {}
    for volume in spec.get("volumes") or []:
        if volume.get("name") == DATASET_URLS_VOLUME:
            return (volume.get("secret") or {}).get("secretName")
    return None


def _generation(obj: dict[str, Any]) -> int | None:
    value = (obj["metadata"].get("labels") or {}).get(LABEL_GENERATION)
    return int(value) if value and value.isdigit() else None


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------- registration


def registry(options: ControllerOptions) -> tuple[kopf.OperatorRegistry, Operator]:
    """A kopf registry with kaiflow's handlers bound to ``options``."""
    reg = kopf.OperatorRegistry()
    op = Operator(options)

    def opted_in(annotations: Any, **_: Any) -> bool:
        return not options.opt_in or annotations.get(ANNOTATION_OPT_IN) == "true"

    def _retryable(fn: Any) -> Any:
        def handler(**kwargs: Any) -> None:
            try:
                fn(**kwargs)
            except kopf.TemporaryError:
                raise
            except RetryableError as exc:
                raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from None
            except StepError as exc:
                # 4xx answers (RBAC, a missing CRD): retrying later may still help once fixed.
                raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S * 6) from None
        handler.__name__ = handler.__qualname__ = fn.__name__  # kopf keys its bookkeeping by handler id
        return handler

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> Any:
        # In a pod: the service account; elsewhere $KUBECONFIG (set from --kubeconfig).
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=reg)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KAIFLOW_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=KAIFLOW_PREFIX, key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        # kopf waits this long for more events of an object before handling it (default 0.1 s);
        # every decision here is idempotent, so intermediate states need not be skipped.
        settings.batching.batch_window = 0.01
        settings.execution.max_workers = options.workers
        settings.watching.server_timeout = 60
        settings.watching.client_timeout = 90
        settings.watching.connect_timeout = 5
        # Filter on the API server, not in Python: the operator never receives the cluster's other
        # pods, Deployments and Workflows (kopf's handler filters alone still stream every object).
        for resource, selector in WATCH_SELECTORS.items():
            settings.watching.label_selectors[resource] = selector
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 5

    @kopf.on.resume(GROUP, PLURAL, registry=reg, when=opted_in, id="reconcile")
    @kopf.on.create(GROUP, PLURAL, registry=reg, when=opted_in, id="reconcile")
    @kopf.on.update(GROUP, PLURAL, registry=reg, when=opted_in, id="reconcile")
    @_retryable
    def reconcile(body: Any, **_: Any) -> None:
        op.reconcile(_plain(body))

    @kopf.timer(GROUP, PLURAL, registry=reg, interval=options.resync_s, initial_delay=options.resync_s,
                when=opted_in, id="resync")
    @_retryable
    def resync(body: Any, **_: Any) -> None:
        op.reconcile(_plain(body))

    @kopf.on.delete(GROUP, PLURAL, registry=reg, when=opted_in, id="finalize")
    @_retryable
    def finalize(body: Any, **_: Any) -> None:
        op.finalize(_plain(body))

    @kopf.on.event("argoproj.io", "v1alpha1", "workflows", registry=reg, labels={LABEL_MANAGED_BY: MANAGED_BY})
    @kopf.on.event("apps", "v1", "deployments", registry=reg, labels={LABEL_MANAGED_BY: MANAGED_BY})
    @kopf.on.event("", "v1", "pods", registry=reg, labels={LABEL_WORKSPACE: kopf.PRESENT})
    def follow(body: Any, **_: Any) -> None:
        labels = body.get("metadata", {}).get("labels") or {}
        workspace = labels.get(LABEL_WORKSPACE)
        if workspace:
            try:
                op.request_refresh(body["metadata"].get("namespace") or "default", workspace)
            except Exception as exc:  # event handlers are not retried; the timer refreshes later
                log.warning("refreshing Workspace %s failed: %s", workspace, exc)

    return reg, op


def _plain(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))
