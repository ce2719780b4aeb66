"""`kaiflow render ... | kubectl apply -f -` and `| argo submit -` on the box's real API server and the
box's argo CLI (docs/reference/cli.md, "render").

- kubectl takes the whole stream (Secrets, ConfigMaps, the named Workflow or CronWorkflow; or the
  `-o json` List) with `apply` (client- and server-side), and still with `create`: server-side dry
  runs, so the API server validates every object and stores nothing.
- Applying the same stream twice (for real, in a fresh namespace) leaves one Workflow, the same
  object; a changed parameter gives another Workflow.
- `argo submit` takes only the Workflow of the stream: the tuning ConfigMap it would drop travels
  inside the Workflow, so nothing the Workflow uses is lost; Argo's own validation (`argo submit
  --server-dry-run` through the API server, `argo lint --offline`) accepts the carried config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaiflow.cli import _references
from pipelines.target import CLUSTER_TRAINING_CONFIG_DIR, TRAINING_CONFIG_KEY
from tests.fixtures.cluster import cluster_tools

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "api" / "kaito_corpus"
WITH_CONFIG = CORPUS / "multi-doc-tuning-configmap.yaml"
WITH_SECRET = CORPUS / "multi-doc-secret-passed-through.yaml"
FILES = [WITH_SECRET, WITH_CONFIG, ROOT / "examples" / "scheduled_tuning_phi_3.yaml"]
CONFIG_PATH = f"{CLUSTER_TRAINING_CONFIG_DIR}/{TRAINING_CONFIG_KEY}"
IGNORED = "is not of kind Workflow. Ignoring"


def _render(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "kaiflow.cli", "render", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _without_namespaces(source: Path, tmp_path: Path) -> Path:
    """The file with its namespaces removed: -n gives the box's namespace, as kubectl's -n would."""
    documents = list(yaml.safe_load_all(source.read_text()))
    for document in documents:
        document["metadata"].pop("namespace", None)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def _argo(cluster_box, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(cluster_tools() / "argo"), *args], capture_output=True, text=True, timeout=120,
                          env={"KUBECONFIG": str(cluster_box.kubeconfig), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("output", ["yaml", "json"])
@pytest.mark.parametrize("source", FILES, ids=[f.stem for f in FILES])
def test_kubectl_takes_the_whole_rendered_stream(cluster_box, box_namespace, source, output, tmp_path):
    path = str(_without_namespaces(source, tmp_path))
    stream = _render("-f", path, "-n", box_namespace, "-o", output).stdout
    rendered = _render("-f", path, "-n", box_namespace, "-o", "name").stdout.split()
    assert rendered[-1].startswith(("workflow.argoproj.io/", "cronworkflow.argoproj.io/"))
    assert not rendered[-1].endswith("-")  # a name, not a generateName prefix
    for command in (["apply"], ["apply", "--server-side", "--field-manager=kaiflow-render-test"], ["create"]):
        done = cluster_box.kubectl(*command, "--dry-run=server", "-o", "name", "-f", "-", input=stream)
        assert done.stdout.split() == rendered, command  # every object of the stream, by the name render gave
    listing = json.loads(_render("-f", path, "-n", box_namespace, "-o", "json").stdout)
    assert {i["metadata"]["namespace"] for i in listing["items"]} == {box_namespace}


def test_applying_the_same_stream_twice_keeps_one_workflow(cluster_box, box_namespace, tmp_path):
    """For real: the Workflow is created once; applying the stream again finds it (same uid), as kubectl
    apply does for any named object. A changed parameter is another Workflow. (The box's Argo starts
    each and fails it at once: the namespace has no kaiflow install, so no pod is made.)"""
    path = str(_without_namespaces(WITH_CONFIG, tmp_path))
    stream = _render("-f", path, "-n", box_namespace).stdout
    name = _render("-f", path, "-n", box_namespace, "-o", "name").stdout.split()[-1]

    def workflows() -> dict[str, str]:
        listing = json.loads(cluster_box.kubectl("get", "workflows", "-n", box_namespace, "-o", "json").stdout)
        return {f"workflow.argoproj.io/{w['metadata']['name']}": w["metadata"]["uid"] for w in listing["items"]}

    first = cluster_box.kubectl("apply", "-f", "-", input=stream)
    assert f"{name} created" in first.stdout
    uid = workflows()[name]
    second = cluster_box.kubectl("apply", "-f", "-", input=stream)
    # "unchanged", or "configured" when Argo's controller has meanwhile written the spec back in its
    # own normalised form (empty fields added): either way the same object, not a second run
    assert f"{name} unchanged" in second.stdout or f"{name} configured" in second.stdout, second.stdout
    assert workflows() == {name: uid}
    again = _render("-f", path, "-n", box_namespace, "-p", "output-image=myregistry.azurecr.io/adapters/x:0.0.2")
    other = _render("-f", path, "-n", box_namespace, "-p", "output-image=myregistry.azurecr.io/adapters/x:0.0.2",
                    "-o", "name").stdout.split()[-1]
    assert other != name
    cluster_box.kubectl("apply", "-f", "-", input=again.stdout)
    assert set(workflows()) == {name, other} and workflows()[name] == uid
    cluster_box.kubectl("delete", "workflows", "--all", "-n", box_namespace, "--wait=false")


def test_argo_submit_takes_a_workflow_that_carries_the_training_config(cluster_box, box_namespace, tmp_path):
    """argo submit drops the ConfigMap document (a warning in its log) and loses nothing: the Workflow
    carries its training_config.yaml where the tune and fetch-dataset steps read it."""
    source = _without_namespaces(WITH_CONFIG, tmp_path)
    config_map = next(d for d in yaml.safe_load_all(source.read_text()) if d["kind"] == "ConfigMap")
    text = config_map["data"][TRAINING_CONFIG_KEY]
    rendered = _render("-f", str(source), "-n", box_namespace)
    assert rendered.stderr == ""  # no note: argo submit of this stream needs nothing else
    stream = tmp_path / "stream.yaml"
    stream.write_text(rendered.stdout)
    name = _render("-f", str(source), "-n", box_namespace, "-o", "name").stdout.split()[-1].split("/", 1)[1]

    for dry_run in ("--dry-run", "--server-dry-run"):  # client-side; then through the real API server
        done = _argo(cluster_box, "submit", dry_run, "-o", "json", "-n", box_namespace, str(stream))
        assert done.returncode == 0, done.stderr
        assert done.stderr.count(IGNORED) == 1, done.stderr  # the ConfigMap, and only it, is dropped
        submitted = json.loads(done.stdout)
        assert submitted["metadata"]["name"] == name
        templates = {t["name"]: t for t in submitted["spec"]["templates"]}
        for step in ("fetch-dataset", "tune"):
            (artifact,) = templates[step]["inputs"]["artifacts"]
            assert (artifact["path"], artifact["raw"]["data"]) == (CONFIG_PATH, text), step
            assert "training-config" not in [m["name"] for m in templates[step]["container"]["volumeMounts"]]
        # no document the Workflow uses was dropped: it mounts no ConfigMap, and names no object of the stream
        dropped = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout)
                   if d["kind"] != "Workflow"}
        assert dropped == {("ConfigMap", config_map["metadata"]["name"])}
        assert not _references(submitted) & dropped
        assert not any(v.get("configMap") for v in submitted["spec"].get("volumes") or [])

    lint = _argo(cluster_box, "lint", "--offline", "--output", "simple", str(stream))
    assert lint.returncode == 0 and "no linting errors found" in lint.stdout, lint.stdout + lint.stderr


def test_argo_submit_drops_the_secret_and_render_says_so(cluster_box, box_namespace, tmp_path):
    """A Secret cannot travel inside a Workflow: argo submit drops it, and render's note names it."""
    source = _without_namespaces(WITH_SECRET, tmp_path)
    rendered = _render("-f", str(source), "-n", box_namespace)
    stream = tmp_path / "stream.yaml"
    stream.write_text(rendered.stdout)
    name = _render("-f", str(source), "-n", box_namespace, "-o", "name").stdout.split()[-1]
    assert rendered.stderr == (f"note: `argo submit` takes only the Workflow of this stream; {name} uses "
                               f"Secret/myregistry-push from it, which must exist in namespace {box_namespace} "
                               "before it runs (`kubectl apply -f -` creates the whole stream)\n")
    done = _argo(cluster_box, "submit", "--dry-run", "-o", "json", "-n", box_namespace, str(stream))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(IGNORED) == 1, done.stderr
    assert ("Secret", "myregistry-push") in _references(json.loads(done.stdout))


def test_argo_submit_takes_no_list(cluster_box, box_namespace, tmp_path):
    """Why the docs pipe the default YAML stream to argo submit: it reads a v1 List (-o json) as one
    object of another kind and finds no Workflow."""
    listing = tmp_path / "list.json"
    listing.write_text(_render("-f", str(_without_namespaces(WITH_CONFIG, tmp_path)), "-n", box_namespace,
                               "-o", "json").stdout)
    done = _argo(cluster_box, "submit", "--dry-run", "-o", "name", "-n", box_namespace, str(listing))
    assert done.returncode != 0 and "No Workflow found" in done.stderr, done.stderr
