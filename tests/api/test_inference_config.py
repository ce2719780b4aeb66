"""Kaito's inference ConfigMap, read for kaiflow's transformers runtime."""

import pytest

from api.inference_config import ServiceSettings, read_inference_config


def _config_map(text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"inference_config.yaml": text}}


def test_max_model_len_and_served_name_take_effect_the_rest_is_named():
    settings = read_inference_config(_config_map(
        "vllm:\n  max-model-len: 1024\n  served-model-name: [support-bot]\n  gpu-memory-utilization: 0.9\n"
        "max_probe_steps: 6\n"))
    assert settings == ServiceSettings(512, 512, "support-bot", ("max_probe_steps", "vllm.gpu-memory-utilization"))
    assert settings.as_env() == {"KAIFLOW_MAX_PROMPT_TOKENS": "512", "KAIFLOW_MAX_NEW_TOKENS": "512",
                                 "KAIFLOW_SERVED_MODEL_NAME": "support-bot"}
    small = read_inference_config(_config_map("vllm:\n  max-model-len: 300\n"))
    assert (small.max_prompt_tokens, small.max_new_tokens) == (150, 150)
    assert read_inference_config(_config_map("")).as_env() == {}


@pytest.mark.parametrize(("data", "message"), [
    ({"other.yaml": "x"}, "data.inference_config.yaml: required"),
    ({"inference_config.yaml": "vllm: [unclosed"}, "not valid YAML"),
    ({"inference_config.yaml": "- a list"}, "must be a mapping"),
    ({"inference_config.yaml": "vllm:\n  max-model-len: true\n"}, "max-model-len must be an integer"),
    ({"inference_config.yaml": "vllm:\n  served-model-name: 3\n"}, "served-model-name must be a string"),
])
def test_bad_config_maps_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        read_inference_config({"data": data})
