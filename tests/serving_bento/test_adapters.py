"""Combining adapters with strengths: the math of the chosen method, and that outputs change."""

from __future__ import annotations

import json

import pytest

from serving_bento.adapters import apply_adapters
from serving_bento.config import AdapterSpec


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _delta(path, adapter_dir, strength=1.0):
    """The weight update one adapter makes at ``strength`` (merged minus base), per module."""
    base = _load(path).state_dict()
    merged = apply_adapters(_load(path), (AdapterSpec("a", str(adapter_dir), strength),)).state_dict()
    return {k: merged[k] - base[k] for k in base if not (merged[k] - base[k]).abs().max() == 0}


def test_cat_combination_is_the_exact_weighted_sum(tiny_model_path, tiny_adapters):
    import torch

    alpha = _delta(tiny_model_path, tiny_adapters["alpha"])
    beta = _delta(tiny_model_path, tiny_adapters["beta"])
    assert alpha and beta
    base = _load(tiny_model_path).state_dict()
    specs = (AdapterSpec("alpha", str(tiny_adapters["alpha"]), 1.0), AdapterSpec("beta", str(tiny_adapters["beta"]), 0.5))
    combined = apply_adapters(_load(tiny_model_path), specs, "cat").state_dict()
    for key in alpha:
        expected = alpha[key] + 0.5 * beta.get(key, torch.zeros_like(alpha[key]))
        torch.testing.assert_close(combined[key] - base[key], expected, atol=1e-5, rtol=1e-4)


def test_one_adapter_at_half_strength_is_half_the_update(tiny_model_path, tiny_adapters):
    import torch

    full = _delta(tiny_model_path, tiny_adapters["alpha"], 1.0)
    half = _delta(tiny_model_path, tiny_adapters["alpha"], 0.5)
    for key in full:
        torch.testing.assert_close(half[key], 0.5 * full[key], atol=1e-5, rtol=1e-4)


def test_different_strengths_change_the_greedy_output(tiny_model_path, tiny_adapters):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    outputs = set()
    for a, b in ((1.0, 0.5), (0.5, 1.0), (0.0, 0.0)):
        specs = (AdapterSpec("alpha", str(tiny_adapters["alpha"]), a), AdapterSpec("beta", str(tiny_adapters["beta"]), b))
        model = apply_adapters(_load(tiny_model_path), specs)
        outputs.add(tuple(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()))
    assert len(outputs) == 3


def test_an_adapter_for_another_model_is_a_clear_config_error(tiny_model_path, tmp_path, tiny_adapters):
    from serving_bento.config import ConfigError

    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapter_model.safetensors").write_bytes((tiny_adapters["alpha"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="KAIFLOW_ADAPTERS"):
        apply_adapters(_load(tiny_model_path), (AdapterSpec("bad", str(bad)),))
