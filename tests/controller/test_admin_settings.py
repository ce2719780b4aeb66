"""What an admin controls in the install (issue 17 items 4 and 6): plain-http dataset URLs and
``trust_remote_code`` are refused unless the controller's options allow them; in a cluster the
fetch step is rendered with ``--public-only`` and the label the egress NetworkPolicy selects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from api.labels import EGRESS_PUBLIC, LABEL_EGRESS
from api.workspace_status import REASON_INVALID
from controller.decide import Desired, Refused, decide
from controller.options import ControllerOptions, parse
from stepkit.common import REMOTE_CODE_ENV, StepError
from steps.tune.kaito_training_config import read_training_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROOT = Path(__file__).resolve().parents[2]


def body(example="kaito_workspace_tuning_phi_3.yaml", namespace="team-a", url=None):
    obj = yaml.safe_load((EXAMPLES / example).read_text())
    obj["metadata"] = {**obj["metadata"], "namespace": namespace, "generation": 1, "uid": "u-1"}
    if url:
        obj["tuning"]["input"]["urls"] = [url]
    return obj


def template(verdict: Desired, name: str) -> dict:
    return next(t for t in verdict.manifest["spec"]["templates"] if t["name"] == name)


def env_of(verdict: Desired, name: str) -> dict:
    return {e["name"]: e.get("value") for e in template(verdict, name)["container"].get("env") or []}


def test_plain_http_dataset_urls_are_refused_unless_the_admin_allows_them():
    verdict = decide(body(url="http://data.example.com/train.parquet"), ControllerOptions())
    assert isinstance(verdict, Refused) and verdict.reason == REASON_INVALID
    assert verdict.fields == ("tuning.input.urls[0]",) and "--allow-http-datasets" in verdict.message
    allowed = decide(body(url="http://data.example.com/train.parquet"), parse(["--allow-http-datasets"]))
    assert isinstance(allowed, Desired)
    assert "--allow-http" in template(allowed, "fetch-dataset")["container"]["args"]


def test_the_fetch_step_in_a_cluster_reaches_public_addresses_only():
    verdict = decide(body(), parse(["--dataset-block-cidr", "203.0.113.0/24"]))
    fetch = template(verdict, "fetch-dataset")
    args = fetch["container"]["args"]
    assert "--public-only" in args and "--allow-http" not in args
    assert args[args.index("--block-cidr") + 1] == "203.0.113.0/24"
    assert fetch["metadata"]["labels"][LABEL_EGRESS] == EGRESS_PUBLIC


def test_an_admin_may_let_dataset_downloads_reach_a_named_private_range():
    """An in-house mirror on a private address: the admin's --dataset-allow-cidr reaches the step
    (--allow-cidr); nothing is allowed by default."""
    args = template(decide(body(), parse(["--dataset-allow-cidr", "10.20.0.0/16"])), "fetch-dataset")["container"]["args"]
    assert args[args.index("--allow-cidr") + 1] == "10.20.0.0/16"
    assert "--allow-cidr" not in template(decide(body(), parse([])), "fetch-dataset")["container"]["args"]


def test_an_adapter_tuned_into_an_insecure_registry_is_pulled_from_it_over_plain_http_too():
    """Found by the box's end-to-end run (tests/cluster/test_end_to_end.py): the deploy task only
    knows its adapter as a placeholder (push-adapter's output), so the Workspace's output registry
    decides --insecure for the chat pod's pull, as it does for the push."""
    obj = body()
    host = obj["tuning"]["output"]["image"].split("/", 1)[0]
    verdict = decide(obj, parse(["--insecure-registry", host]))
    assert "--insecure" in template(verdict, "push-adapter")["container"]["args"]
    assert "--insecure" in template(verdict, "deploy-inference")["container"]["args"]
    assert "--insecure" not in template(decide(body(), parse([])), "deploy-inference")["container"]["args"]


@pytest.mark.parametrize("flag", ["--dataset-allow-cidr", "--dataset-block-cidr"])
def test_an_address_range_that_is_not_one_is_refused_at_start_naming_the_option(flag, capsys):
    with pytest.raises(SystemExit) as exited:
        parse([flag, "10.20.0.0/33"])
    assert exited.value.code == 2
    assert f"{flag}: '10.20.0.0/33' is not an address range" in capsys.readouterr().err


@pytest.mark.parametrize(("allow", "namespace", "refused"), [
    ((), "team-a", True),
    (("team-b",), "team-a", True),
    (("team-a",), "team-a", False),
    (("team-a/phi-3-mini-4k-instruct",), "team-a", False),
    (("team-a/another-model",), "team-a", True),
    (("*/phi-3-mini-4k-instruct",), "team-z", False),
])
def test_trust_remote_code_is_refused_unless_the_admin_allows_the_namespace_or_model(allow, namespace, refused):
    options = parse([a for entry in allow for a in ("--allow-remote-code", entry)])
    verdict = decide(body(namespace=namespace), options)
    assert isinstance(verdict, Desired)
    assert (env_of(verdict, "tune").get(REMOTE_CODE_ENV) == "refuse") is refused


def test_the_tune_step_refuses_trust_remote_code_where_the_pipeline_says_so(tmp_path, monkeypatch):
    config = tmp_path / "training_config.yaml"
    config.write_text(yaml.safe_dump({"training_config": {"ModelConfig": {"trust_remote_code": True}}}))
    assert read_training_config(config)["ModelConfig"]["trust_remote_code"] is True  # locally: the user's own machine
    monkeypatch.setenv(REMOTE_CODE_ENV, "refuse")
    with pytest.raises(StepError, match=r"ModelConfig\.trust_remote_code: refused in this cluster"):
        read_training_config(config)
    config.write_text(yaml.safe_dump({"training_config": {"ModelConfig": {"trust_remote_code": False}}}))
    assert read_training_config(config)["ModelConfig"]["trust_remote_code"] is False


SIGNED = "https://acct.blob.core.windows.net/data/train.parquet?sv=2025-01-05&se=2027-01-01&sig=S3CRETSIGNATURE"


def test_signed_dataset_urls_travel_in_a_secret_not_in_the_workflow():
    """Issue 17 (Low): a URL with a query string goes in a Secret the operator creates (a new one per
    run, generateName); the Workflow spec and the fetch pod's arguments never carry it."""
    verdict = decide(body(url=SIGNED), ControllerOptions())
    assert isinstance(verdict, Desired) and verdict.secret is not None
    secret = verdict.secret
    assert secret["kind"] == "Secret" and secret["metadata"]["generateName"] == "workspace-tuning-phi-3-mini-dataset-urls-"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert list(secret["stringData"].values()) == [SIGNED + "\n"]
    import json

    assert "S3CRETSIGNATURE" not in json.dumps(verdict.manifest)
    fetch = template(verdict, "fetch-dataset")
    args = fetch["container"]["args"]
    assert "--url" not in args and args[args.index("--url-file") + 1] == "/kaiflow/dataset-urls/dataset-urls.txt"
    volume = next(v for v in verdict.manifest["spec"]["volumes"] if v["name"] == "dataset-urls")
    assert volume["secret"]["secretName"] == secret["metadata"]["generateName"]  # the operator fills in the name
    plain = decide(body(url="https://data.example.com/train.parquet"), ControllerOptions())
    assert plain.secret is None and "--url" in template(plain, "fetch-dataset")["container"]["args"]
