"""Beside Kaito (docs/install.md): the install's server-side apply of kaiflow's CRD refuses to take
over a CRD Kaito's Helm chart wrote, unless the user says --force-conflicts.

Kaito's real CRD (the reference copy in shared/kaito, when present) and kaiflow's are both moved to
a test group so the session's own workspaces.kaito.sh is never touched: Kaito's goes in as Helm
writes it (a client-side write by field manager "helm", Helm's labels and annotations), then
kaiflow's is applied as the install does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import ROOT

KAITO_CRD = next((p / "shared" / "kaito" / "kaito.sh_workspaces.crd.yaml" for p in ROOT.parents
                  if (p / "shared" / "kaito" / "kaito.sh_workspaces.crd.yaml").exists()), None)
GROUP = "kaito-beside.example"


def _moved(crd: dict) -> dict:
    crd = yaml.safe_load(yaml.safe_dump(crd))
    crd["metadata"]["name"] = f"workspaces.{GROUP}"
    crd["spec"]["group"] = GROUP
    crd["spec"]["names"].pop("shortNames", None)
    crd["spec"]["names"].pop("categories", None)
    return crd


@pytest.mark.skipif(KAITO_CRD is None, reason="Kaito's reference CRD (shared/kaito) is not on this machine")
def test_applying_kaiflows_crd_over_kaitos_helm_owned_one_is_refused_until_forced(installed, tmp_path):
    box = installed
    kaito = _moved(yaml.safe_load(KAITO_CRD.read_text()))
    kaito["metadata"].setdefault("labels", {})["app.kubernetes.io/managed-by"] = "Helm"
    kaito["metadata"].setdefault("annotations", {}).update({"meta.helm.sh/release-name": "kaito-workspace",
                                                             "meta.helm.sh/release-namespace": "kaito-workspace"})
    ours = _moved(yaml.safe_load((ROOT / "controller" / "manifests" / "kaito.sh_workspaces.yaml").read_text()))
    (tmp_path / "kaito.yaml").write_text(yaml.safe_dump(kaito))
    (tmp_path / "ours.yaml").write_text(yaml.safe_dump(ours))
    try:
        box.kubectl("create", "--field-manager=helm", "-f", str(tmp_path / "kaito.yaml"))
        refused = box.kubectl("apply", "--server-side", "-f", str(tmp_path / "ours.yaml"), check=False)
        assert refused.returncode != 0
        assert "conflict" in refused.stderr.lower() and "helm" in refused.stderr, refused.stderr[-2000:]
        forced = box.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(tmp_path / "ours.yaml"))
        assert forced.returncode == 0
        stored = box.get("crd", f"workspaces.{GROUP}")
        v1beta1 = next(v for v in stored["spec"]["versions"] if v["name"] == "v1beta1")
        assert "schedule" in v1beta1["schema"]["openAPIV3Schema"]["properties"]["tuning"]["properties"]
    finally:
        box.kubectl("delete", "crd", f"workspaces.{GROUP}", "--ignore-not-found", check=False)
