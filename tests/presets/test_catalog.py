"""Every name Kaito accepts resolves; the catalogue file stays what the generator makes of Kaito's data."""

import json
from pathlib import Path

import pytest
import yaml

from presets import UnknownPresetError, get_preset, list_presets
from presets.catalog import legacy_names
from presets.gpus import check_fit, get_sku, pick_instance
from presets.sizing import (
    GIB,
    UnsizedModelError,
    check_fit_from_config,
    estimate_inference,
    kaito_gpus_needed,
    kv_bytes_per_token,
    preset_from_config,
)

ROOT = Path(__file__).resolve().parents[2]
KAITO = Path("/work/shared/kaito")
CATALOG_FILE = ROOT / "presets" / "catalog_models.yaml"

LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}


def test_catalogue_file_matches_kaito_data():
    data = yaml.safe_load(CATALOG_FILE.read_text())
    if KAITO.is_dir():  # the reference data is here: the checked-in file must be what the generator makes of it
        from presets.generate_catalog import build

        assert build(yaml.safe_load((KAITO / "model_catalog.yaml").read_text())) == data
        kaito_names = {m["name"] for m in yaml.safe_load((KAITO / "supported_models.yaml").read_text())["models"]}
        # every short name Kaito still resolves is a legacy name here (falcon-* and phi-2 are kaiflow's own)
        resolved = {n for n in kaito_names if n != "base" and not n.startswith(("falcon", "phi-2"))}
        assert resolved == set(data["legacy_names"])
    assert len(data["models"]) == 60 and len(data["legacy_names"]) == 25
    lowered = {k.lower() for k in data["models"]}
    assert all(hf_id in lowered for hf_id in data["legacy_names"].values())


@pytest.mark.parametrize("name", sorted(legacy_names()))
def test_every_legacy_name_resolves_case_insensitively(name):
    preset = get_preset(name.upper())
    assert preset.sized and preset.source.lower() == legacy_names()[name]
    assert preset.served_name == legacy_names()[name].rsplit("/", 1)[-1]


def test_every_catalogue_id_resolves_and_is_sized():
    data = yaml.safe_load(CATALOG_FILE.read_text())
    for hf_id in data["models"]:
        preset = get_preset(hf_id)
        assert preset.source.lower() == hf_id.lower() and preset.sized
        assert estimate_inference(preset).total_bytes > preset.file_size_gib * GIB if preset.file_size_gib else True


def test_kaiflow_presets_win_over_the_catalogue():
    assert get_preset("microsoft/Phi-3-mini-4k-instruct").name == "phi-3-mini-4k-instruct"
    assert get_preset("mistralai/mistral-7b-instruct-v0.3").name == "mistral-7b-instruct"
    assert get_preset("mistral-7b-instruct").served_name == "mistral-7b-instruct-v0.3"  # Kaito's served name
    assert get_preset("falcon-7b").origin == "kaiflow"


def test_generic_hf_id_is_accepted_but_unsized():
    preset = get_preset("contoso/My-Model.v2")
    assert preset.origin == "generic" and not preset.sized and preset.served_name == "my-model.v2"
    with pytest.raises(UnsizedModelError, match="sizing is deferred"):
        estimate_inference(preset)
    for bad in ("not a name", "org/", "a/b/c", "org/na..me"):
        with pytest.raises(UnknownPresetError):
            get_preset(bad)


def test_listing_names_each_model_once():
    listed = list_presets()
    sources = [p.source.lower() for p in listed]
    assert len(sources) == len(set(sources))
    # kaiflow's 16 presets cover 12 catalogue IDs (the phi-3/phi-4 family, llama-3.1-8b, mistral-7b×2, ...)
    assert len(listed) == 16 + 60 - 12
    gpt = next(p for p in listed if p.source == "openai/gpt-oss-20b")
    assert gpt.aliases == ("gpt-oss-20b",) and not gpt.tuning
    assert gpt.params_b == 20.91  # the model card's total, not the mxfp4 file size / 0.55 (50 B)


def test_mla_kv_cache_uses_the_compressed_rank():
    r1 = get_preset("deepseek-r1-0528")
    assert kv_bytes_per_token(r1) == (512 + 64) * r1.layers * 2
    phi = get_preset("phi-3-mini-4k-instruct")
    assert kv_bytes_per_token(phi) == 2 * 32 * 32 * 96 * 2


def test_kaito_node_estimate_follows_its_formula():
    llama70 = get_preset("llama-3.3-70b-instruct")
    # 131.42 GiB × 1.02; an 80 GiB GPU holds 80 × 0.84 − 2.3 − 0.05 × share − KV(2048) of it: 3 GPUs
    assert kaito_gpus_needed(llama70, 80) == 3
    assert "needs 3 such nodes" in check_fit("Standard_NC24ads_A100_v4", llama70, None)
    assert check_fit("Standard_ND96isr_H200_v5", llama70, None) is None
    assert pick_instance(get_preset("deepseek-r1-0528"), None).name == "Standard_ND96isr_H200_v5"
    with pytest.raises(ValueError, match="no known GPU SKU fits"):  # LoRA keeps a bf16 70B base on one GPU
        pick_instance(llama70, "lora")


def test_amd_skus_are_never_picked():
    assert get_sku("Standard_NG32ads_V620_v1").vendor == "amd"
    for preset in list_presets():
        try:
            assert pick_instance(preset, None).vendor == "nvidia"
        except ValueError:
            pass


def test_fit_from_config_json(tmp_path):
    preset = preset_from_config(LLAMA_8B_CONFIG, "meta-llama/Llama-3.1-8B-Instruct")
    assert 8.0 < preset.params_b < 8.06  # 8.03 B on the model card
    problem = check_fit_from_config(LLAMA_8B_CONFIG, 16, None, name="llama-8b")
    assert problem.startswith("llama-8b (8.03B parameters from config.json) needs ≈18.1 GiB (weights 14.96")
    assert problem.endswith("more than the 16 GiB available")
    assert check_fit_from_config(LLAMA_8B_CONFIG, 24, None) is None
    assert check_fit_from_config(LLAMA_8B_CONFIG, 16, "qlora") is None
    assert "lora tuning on one GPU" in check_fit_from_config(LLAMA_8B_CONFIG, 16, "lora")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": LLAMA_8B_CONFIG, "architectures": ["X"]}))
    assert check_fit_from_config(str(path), 24, None) is None
    with pytest.raises(UnsizedModelError, match="config.json has no hidden_size"):
        check_fit_from_config({"model_type": "x"}, 80, None)
