"""Rendered pipelines reference secrets and never contain them.

Canary values are put everywhere a careless renderer could pick a secret up - the environment
(HF token, Azure client secret, registry password), a docker config file handed to the local
runner - and every example is rendered for the cluster and for local runs. The canaries must not
appear, in clear or base64, and every credential-looking env var must come from a secretKeyRef.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import pipelines
from pipelines import Images, Target
from pipelines.structure import workflow_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CANARIES = {
    "HF_TOKEN": "hf_canaryTOKENdoNotLeak0123456789",
    "AZURE_CLIENT_SECRET": "azure~canary~client~secret~42",
    "KAIFLOW_REGISTRY_PASSWORD": "registry-canary-password-77",
    "GITHUB_TOKEN": "ghp_canaryGithubToken000000000000000",
}
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "CLIENT_KEY")


def _forbidden() -> list[str]:
    values = list(CANARIES.values())
    values += [base64.b64encode(v.encode()).decode() for v in CANARIES.values()]
    auth = base64.b64encode(f"kaiflow:{CANARIES['KAIFLOW_REGISTRY_PASSWORD']}".encode()).decode()
    return values + [auth]


def _renderings(tmp_path: Path):
    docker_config = tmp_path / "config.json"
    auth = base64.b64encode(f"kaiflow:{CANARIES['KAIFLOW_REGISTRY_PASSWORD']}".encode()).decode()
    docker_config.write_text(json.dumps({"auths": {"127.0.0.1:5000": {"auth": auth}}}))
    for example in EXAMPLES:
        yield example, "cluster", pipelines.render(example, Target.cluster(images=Images()))
        local = Target.local(tmp_path / "work", base_dir=example.parent, port=3000, docker_config_file=docker_config)
        yield example, "local", pipelines.render(example, local)


def test_no_secret_value_in_any_rendered_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    for example, mode, text in _renderings(tmp_path):
        for secret in _forbidden():
            assert secret not in text, f"{example.name} ({mode}) leaks a secret value"
        assert '"auths"' not in text and "auths:" not in text, f"{example.name} ({mode}) embeds a docker config"


def _env_vars(manifest: dict):
    for template in workflow_spec(manifest)["templates"]:
        for var in (template.get("container") or {}).get("env") or []:
            yield template["name"], var


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_credentials_only_by_reference(example: Path):
    manifest = pipelines.manifest(example, Target.cluster(images=Images()))
    for template, var in _env_vars(manifest):
        if any(word in var["name"].upper() for word in SECRET_WORDS):
            assert "value" not in var, f"{template}: {var['name']} has a literal value"
            assert "secretKeyRef" in var["valueFrom"], f"{template}: {var['name']} must come from a Secret"


def test_push_secret_is_mounted_as_a_docker_config_volume():
    manifest = pipelines.manifest(ROOT / "examples" / "scheduled_tuning_phi_3.yaml", Target.cluster(images=Images()))
    spec = workflow_spec(manifest)
    volume = next(v for v in spec["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == "myregistry-push-secret"
    assert volume["secret"]["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    templates = {t["name"]: t for t in spec["templates"]}
    for name in ("eval-gate", "push-adapter", "push-candidate"):
        container = templates[name]["container"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert mount["readOnly"] is True
        args = container["args"]
        assert args[args.index("--docker-config") + 1] == f"{mount['mountPath']}/config.json"
    deploy = templates["deploy-inference"]["container"]["args"]
    assert deploy[deploy.index("--docker-config-secret") + 1] == "myregistry-push-secret"


def test_azure_identity_is_workload_identity_not_a_secret():
    manifest = pipelines.manifest(ROOT / "examples" / "kaito_workspace_phi_3.yaml", Target.cluster(images=Images(), provider="aks"))
    provision = next(t for t in workflow_spec(manifest)["templates"] if t["name"] == "provision-nodes")
    assert provision["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert provision["serviceAccountName"] == "kaiflow-provisioner"
    env = {v["name"]: v for v in provision["container"]["env"]}
    assert "AZURE_CLIENT_SECRET" not in env
    assert all("configMapKeyRef" in v["valueFrom"] for v in env.values())
