"""Kaito-style Workspaces as Kaito users write them: each file's header gives the expected outcome.

``# expect: ok`` validates without warnings; ``warn`` validates with a warning at
``# expect-path`` containing ``# expect-message``; ``error`` is refused with that path and text.
``# mode: local`` checks with ``kaiflow run``'s rules instead of the cluster's. Every accepted
cluster Workspace must also render (``kaiflow render``) with its companion documents.
"""

import re
from pathlib import Path

import pytest
import yaml

from api import WorkspaceValidationError
from api.workspace_validation import load_bundle
from kaiflow.cli import main

CORPUS = sorted((Path(__file__).parent / "kaito_corpus").glob("*.yaml"))


def _header(path: Path) -> dict[str, str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return dict(re.findall(r"^# (expect|mode|expect-path|expect-message): ?(.*)$", text, re.MULTILINE))


def test_corpus_covers_every_outcome():
    outcomes = [_header(p)["expect"] for p in CORPUS]
    assert len(CORPUS) >= 60 and set(outcomes) == {"ok", "warn", "error"}
    assert min(outcomes.count(o) for o in ("ok", "warn", "error")) >= 8


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_file_has_expected_outcome(path):
    header = _header(path)
    mode = header.get("mode", "cluster")
    if header["expect"] == "error":
        with pytest.raises(WorkspaceValidationError) as info:
            load_bundle(path, mode=mode)
        matching = [e for e in info.value.errors if e.path == header["expect-path"]]
        assert matching, f"no error at {header['expect-path']!r}; got {[str(e) for e in info.value.errors]}"
        assert any(header["expect-message"] in e.message for e in matching), [str(e) for e in matching]
        return
    bundle = load_bundle(path, mode=mode)
    assert bundle.workspaces
    if header["expect"] == "ok":
        assert bundle.warnings == [], [str(w) for w in bundle.warnings]
    else:
        matching = [w for w in bundle.warnings if w.path == header["expect-path"]]
        assert any(header["expect-message"] in w.message for w in matching), [str(w) for w in bundle.warnings]


ACCEPTED_IN_CLUSTER = [p for p in CORPUS if _header(p)["expect"] != "error" and _header(p).get("mode", "cluster") == "cluster"]


@pytest.mark.parametrize("path", ACCEPTED_IN_CLUSTER, ids=lambda p: p.stem)
def test_accepted_workspaces_render_with_their_companions(path, capsys):
    bundle = load_bundle(path, mode="cluster")
    assert main(["render", str(path)]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    expected = [("Secret", s["metadata"]["name"]) for s in bundle.secrets]  # passed through first
    for ws in bundle.workspaces:
        expected += [(c["kind"], c["metadata"]["name"]) for c in bundle.companions_for(ws)] + [("Workflow", ws.name)]
    got = [(d["kind"], d["metadata"]["name"] if d["kind"] != "Workflow" else d["metadata"]["labels"]["kaito.sh/workspace"])
           for d in documents]
    assert got == expected
    namespaces = {ws.namespace for ws in bundle.workspaces}
    assert all(d["metadata"]["namespace"] in namespaces for d in documents)
