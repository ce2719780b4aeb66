"""api.defaults: what runs when a Workspace leaves a field out."""

from pathlib import Path

import yaml

from api import defaults, validate_workspace
from api.workspace_validation import load_bundle

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "kaito_corpus"


def _example(name: str, **changes) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / name).read_text())
    for path, value in changes.items():
        node = raw
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


def test_instance_type_written_picked_or_none_on_own_nodes():
    written = validate_workspace(_example("kaito_workspace_phi_3.yaml"))
    assert defaults.instance_type(written) == "Standard_NC6s_v3"
    picked = validate_workspace(_example("kaito_workspace_phi_3.yaml", **{"resource.instanceType": None}))
    assert defaults.instance_type(picked) == "Standard_NC4as_T4_v3"  # the smallest that holds 10.9 GiB
    own = load_bundle(ROOT / "examples" / "kaito_workspace_byo_nodes.yaml").workspaces[0]
    assert defaults.uses_own_nodes(own) and defaults.instance_type(own) is None
    sku = defaults.node_sku(own)
    assert (sku.name, sku.gpus, sku.vcpus) == ("bring-your-own", defaults.UNKNOWN_NODE_GPUS, defaults.UNKNOWN_NODE_VCPUS)


def test_unchecked_sku_is_sized_as_an_unknown_node():
    ws = load_bundle(CORPUS / "sku-unknown-d-unchecked.yaml").workspaces[0]
    sku = defaults.node_sku(ws)
    assert sku.name == "Standard_D16s_v5" and sku.gpus == 1 and sku.memory_gib == defaults.UNKNOWN_NODE_MEMORY_GIB


def test_method_defaults_and_is_lowercased():
    ws = validate_workspace(_example("kaito_workspace_tuning_phi_3.yaml", **{"tuning.method": None}))
    assert defaults.tuning_method(ws) == defaults.DEFAULT_METHOD == "lora"
    ws = validate_workspace(_example("kaito_workspace_tuning_phi_3.yaml", **{"tuning.method": "QLoRA"}))
    assert ws.tuning.method == "qlora"
    assert defaults.tuning_method(validate_workspace(_example("kaito_workspace_phi_3.yaml"))) is None


def test_target_node_count_follows_kaitos_estimate():
    one = load_bundle(CORPUS / "legacy-gpt-oss-20b.yaml").workspaces[0]
    assert defaults.target_node_count(one) == 1
    # validation refuses this one (kaiflow serves on one node); the estimate is what Kaito would provision
    raw = yaml.safe_load((CORPUS / "legacy-llama-70b-needs-more-nodes.yaml").read_text())
    ws = validate_workspace({**raw, "resource": {**raw["resource"], "instanceType": "Standard_ND96isr_H200_v5"}})
    assert defaults.target_node_count(ws) == 1
    ws.resource.instance_type = "Standard_NC24ads_A100_v4"
    assert defaults.nodes_needed(ws) == 3 and defaults.target_node_count(ws) == 3
    ws.resource.count = 5
    assert defaults.target_node_count(ws) == 5
    generic = load_bundle(CORPUS / "generic-hf-id.yaml").workspaces[0]
    assert defaults.nodes_needed(generic) is None and defaults.target_node_count(generic) == 1


def test_deadline_and_volume_grow_with_the_model_and_are_largest_when_unknown():
    from presets import get_preset

    tiny, phi4, generic = get_preset("kaiflow-tiny-test"), get_preset("phi-4"), get_preset("contoso/x")
    assert defaults.tune_deadline_s(tiny) == 6 * 3600 < defaults.tune_deadline_s(phi4) == int(14.66 * 2 * 3600)
    assert defaults.tune_deadline_s(generic) == 48 * 3600
    assert defaults.data_volume_gib(tiny) == 21 < defaults.data_volume_gib(phi4)  # ceil(tiny) + 20 < defaults.data_volume_gib(generic)
