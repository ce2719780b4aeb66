"""`kaiflow render ... | kubectl create -f -` on the box's real API server: the whole stream (Secrets,
ConfigMaps, the Workflow or CronWorkflow; or the `-o json` List) is accepted in one command, as the
docs say (docs/reference/cli.md, "render"). Server-side dry run: the API server validates every
object, nothing is stored, so the box's Argo runs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "api" / "kaito_corpus"
FILES = [CORPUS / "multi-doc-secret-passed-through.yaml", CORPUS / "multi-doc-tuning-configmap.yaml",
         ROOT / "examples" / "scheduled_tuning_phi_3.yaml"]


def _render(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "render", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("output", ["yaml", "json"])
@pytest.mark.parametrize("source", FILES, ids=[f.stem for f in FILES])
def test_kubectl_creates_the_whole_rendered_stream(cluster_box, box_namespace, source, output, tmp_path):
    documents = list(yaml.safe_load_all(source.read_text()))
    for document in documents:  # -n gives the namespace, as kubectl's -n would
        document["metadata"].pop("namespace", None)
    source = tmp_path / source.name
    source.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    stream = _render("-f", str(source), "-n", box_namespace, "-o", output)
    done = cluster_box.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-", input=stream)
    created = done.stdout.split()
    rendered = _render("-f", str(source), "-n", box_namespace, "-o", "name").split()
    assert len(created) == len(rendered) >= 1, (created, rendered)  # every object of the stream, none dropped
    for made, shown in zip(created, rendered):  # a Workflow's generateName gets its suffix from the server
        assert made.startswith(shown), (made, shown)
    listing = json.loads(_render("-f", str(source), "-n", box_namespace, "-o", "json"))
    assert {i["metadata"]["namespace"] for i in listing["items"]} == {box_namespace}


def test_argo_submit_reads_only_the_workflow_of_the_stream(cluster_box, box_namespace, tmp_path):
    """Why the docs say `kubectl create -f -`: argo submit takes the Workflow of the stream and drops
    the ConfigMap it mounts (a warning in its log), which `render` says on standard error too."""
    from tests.fixtures.cluster import cluster_tools

    source = CORPUS / "multi-doc-tuning-configmap.yaml"
    documents = list(yaml.safe_load_all(source.read_text()))
    for document in documents:
        document["metadata"].pop("namespace", None)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    stream = tmp_path / "stream.yaml"
    stream.write_text(_render("-f", str(path), "-n", box_namespace))
    done = subprocess.run([str(cluster_tools() / "argo"), "submit", "--dry-run", "-o", "json", "-n", box_namespace,
                           str(stream)], capture_output=True, text=True, timeout=120,
                          env={"KUBECONFIG": str(cluster_box.kubeconfig), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert '"generateName": "tuning-with-config-tuning-"' in done.stdout  # the Workflow is submitted
    assert done.stderr.count("is not of kind Workflow. Ignoring") == 1, done.stderr  # the ConfigMap is not
