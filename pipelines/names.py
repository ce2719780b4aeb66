"""The DAG's task and output names, and Kubernetes names derived from user-given ones.

Task and output names are read across packages: ``pipelines.dags`` names the tasks,
``controller.status`` reads a Workflow's nodes by them, the local console prints their outputs.
They live here once; ``tests/api/test_names_live_once.py`` fails on such a literal elsewhere.


A Secret name is a DNS-1123 *subdomain* (``acr.push`` is fine), but a volume name must be a
DNS-1123 *label*: no dots, at most 63 characters. ``dns1123_label`` maps any text to a valid label
that stays the same for the same text; when it had to change the text (a character replaced,
cut to length) it appends a short hash of the original, so ``acr.push`` and ``acr-push`` do not
collide on one volume name.
"""

from __future__ import annotations

import hashlib
import re

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL = 63
MAX_CRON_WORKFLOW_NAME = 52
MAX_GENERATE_NAME_PREFIX = 58
HASH_CHARS = 8

# DAG task names.
TASK_PROVISION = "provision-nodes"
TASK_FETCH_DATASET = "fetch-dataset"
TASK_TUNE = "tune"
TASK_EVAL_GATE = "eval-gate"
TASK_PUSH_ADAPTER = "push-adapter"
TASK_PUSH_CANDIDATE = "push-candidate"
TASK_PULL_ADAPTERS = "pull-adapters"
TASK_DEPLOY = "deploy-inference"
TASK_SMOKE_TEST = "smoke-test"
TASK_RELEASE_NODES = "release-nodes"
TASKS = (TASK_PROVISION, TASK_FETCH_DATASET, TASK_TUNE, TASK_EVAL_GATE, TASK_PUSH_ADAPTER, TASK_PUSH_CANDIDATE,
         TASK_PULL_ADAPTERS, TASK_DEPLOY, TASK_SMOKE_TEST, TASK_RELEASE_NODES)

# Output parameters read by later tasks, the controller or the console (the step writes a file of
# the same name: stepkit.common.write_output).
OUTPUT_NODES = "nodes"
OUTPUT_PROVIDER = "provider"
OUTPUT_DATASET_DIGEST = "dataset-digest"
OUTPUT_PROMOTE = "promote"
OUTPUT_IMAGE = "image"
OUTPUT_SERVICE_URL = "service-url"


def task_output_ref(task: str, output: str) -> str:
    """Argo's reference to another task's output parameter."""
    return f"{{{{tasks.{task}.outputs.parameters.{output}}}}}"


def is_dns1123_label(name: str) -> bool:
    return len(name) <= MAX_LABEL and bool(DNS1123_LABEL.match(name))


def dns1123_label(text: str, limit: int = MAX_LABEL) -> str:
    """``text`` itself when it is a valid label of at most ``limit`` characters, else a stable valid
    label with a hash suffix."""
    if is_dns1123_label(text) and len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    cleaned = cleaned[: limit - HASH_CHARS - 1].rstrip("-")
    return f"{cleaned}-{digest}" if cleaned else digest


def cron_workflow_name(workspace: str) -> str:
    """A scheduled tuning's CronWorkflow: Argo names each run ``<name>-<10-digit time>`` and refuses
    (when it schedules, not when it is created) a CronWorkflow name over 52 characters."""
    return dns1123_label(f"{workspace}-tuning", MAX_CRON_WORKFLOW_NAME)


def generate_name(workspace: str, kind: str) -> str:
    """A Workflow's ``generateName``: the API server keeps a prefix of at most 58 characters and adds 5."""
    return dns1123_label(f"{workspace}-{kind}", MAX_GENERATE_NAME_PREFIX - 1) + "-"
