"""ServiceConfig from environment variables: values, adapters, and clear errors naming the variable."""

from __future__ import annotations

import json

import pytest

from serving_bento.config import AdapterSpec, ConfigError, ServiceConfig, parse_adapters


def test_defaults_and_values():
    config = ServiceConfig.from_env({"KAIFLOW_MODEL": "kaiflow-tiny-test", "KAIFLOW_MAX_NEW_TOKENS": "64",
                                     "KAIFLOW_MERGE_ADAPTERS": "false", "KAIFLOW_ENGINE": "naive"})
    assert (config.model, config.max_new_tokens, config.merge_adapters, config.engine) == \
        ("kaiflow-tiny-test", 64, False, "naive")
    assert config.model_id() == "kaiflow-tiny-test"
    assert ServiceConfig.from_env({}).model == "smollm2-135m-instruct"
    assert ServiceConfig.from_env({}).prefix_cache_tokens == 1024  # on by default (docs/user-guide/serving.md)
    assert ServiceConfig.from_env({"KAIFLOW_PREFIX_CACHE_TOKENS": "0"}).prefix_cache_tokens == 0
    assert ServiceConfig.from_env({"KAIFLOW_PREFIX_CACHE_TOKENS": "256"}).prefix_cache_tokens == 256


def test_adapters_as_json_with_kaito_string_strengths():
    raw = json.dumps([{"name": "a", "path": "/x/a", "strength": "0.5"}, {"name": "b", "path": "/x/b"}])
    assert parse_adapters(raw) == (AdapterSpec("a", "/x/a", 0.5), AdapterSpec("b", "/x/b", 1.0))


def test_adapters_as_a_folder(tmp_path):
    for name in ("b", "a", "not-an-adapter"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "b" / "adapter_config.json").write_text("{}")
    assert [a.name for a in parse_adapters(str(tmp_path))] == ["a", "b"]


def test_api_key_from_a_file_is_never_shown(tmp_path):
    (tmp_path / "key").write_text("s3cret\n")
    config = ServiceConfig.from_env({"KAIFLOW_API_KEY_FILE": str(tmp_path / "key")})
    assert config.api_key == "s3cret" and "s3cret" not in repr(config)


@pytest.mark.parametrize(("env", "message"), [
    ({"KAIFLOW_MAX_NEW_TOKENS": "lots"}, "KAIFLOW_MAX_NEW_TOKENS: 'lots' is not an integer"),
    ({"KAIFLOW_MAX_BODY_BYTES": "0"}, "KAIFLOW_MAX_BODY_BYTES: must be at least 1"),
    ({"KAIFLOW_MERGE_ADAPTERS": "maybe"}, "KAIFLOW_MERGE_ADAPTERS: 'maybe' is not a boolean"),
    ({"KAIFLOW_ENGINE": "turbo"}, "KAIFLOW_ENGINE: 'turbo'"),
    ({"KAIFLOW_ADAPTER_COMBINATION": "magic"}, "KAIFLOW_ADAPTER_COMBINATION: 'magic'"),
    ({"KAIFLOW_ADAPTERS": "[{"}, "KAIFLOW_ADAPTERS: not valid JSON"),
    ({"KAIFLOW_ADAPTERS": "/no/such/folder"}, "neither a JSON list nor an existing folder"),
    ({"KAIFLOW_ADAPTERS": '[{"name": "a"}]'}, "KAIFLOW_ADAPTERS[0].path"),
    ({"KAIFLOW_ADAPTERS": '[{"name": "a", "path": "/p", "strength": -1}]'}, "KAIFLOW_ADAPTERS[0].strength"),
    ({"KAIFLOW_ADAPTERS": '[{"name": "a", "path": "/p", "strength": "high"}]'}, "'high' is not a number"),
    ({"KAIFLOW_ADAPTERS": '[{"name": "a", "path": "/p", "weight": 1}]'}, "unknown keys ['weight']"),
    ({"KAIFLOW_ADAPTERS": '[{"name": "a", "path": "/p"}, {"name": "a", "path": "/q"}]'}, "names repeat"),
    ({"KAIFLOW_API_KEY_FILE": "/no/such/key"}, "KAIFLOW_API_KEY_FILE: cannot read"),
    ({"KAIFLOW_API_KEY": ""}, "KAIFLOW_API_KEY is set but empty"),
    ({"KAIFLOW_API_KEY": "  \n"}, "KAIFLOW_API_KEY is set but empty"),
    ({"KAIFLOW_ADAPTER_MODE": "mixed"}, "KAIFLOW_ADAPTER_MODE: 'mixed' is not one of merged, per-request"),
    ({"KAIFLOW_MAX_PROMPT_CHARS": "-1"}, "KAIFLOW_MAX_PROMPT_CHARS"),
    ({"KAIFLOW_PREFIX_CACHE_TOKENS": "-5"}, "KAIFLOW_PREFIX_CACHE_TOKENS: must be 0 (off) or more"),
    ({"KAIFLOW_ADAPTER_MODE": "per-request", "KAIFLOW_MODEL": "kaiflow-tiny-test",
      "KAIFLOW_ADAPTERS": '[{"name": "kaiflow-tiny-test", "path": "/p"}]'}, "is the base model's id"),
])
def test_bad_settings_name_their_variable(env, message):
    with pytest.raises(ConfigError) as info:
        ServiceConfig.from_env(env)
    assert message in str(info.value)


def test_an_empty_key_file_refuses_to_start(tmp_path):
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="is empty: refusing to start"):
        ServiceConfig.from_env({"KAIFLOW_API_KEY_FILE": str(tmp_path / "key")})


def test_served_names_follow_kaito_and_the_prompt_character_cap():
    # Kaito's served name: the lowercased last part of the HF ID
    assert ServiceConfig(model="mistral-7b-instruct").model_id() == "mistral-7b-instruct-v0.3"
    assert ServiceConfig(model="kaiflow-tiny-test").model_id() == "kaiflow-tiny-test"  # local preset: its name
    assert ServiceConfig(model="/models/My-Model").model_id() == "my-model"
    assert ServiceConfig(model="smollm2-135m-instruct", served_model_name="chat").model_id() == "chat"
    assert ServiceConfig(max_prompt_tokens=100).prompt_char_limit == 1600
    assert ServiceConfig(max_prompt_tokens=100, max_prompt_chars=50).prompt_char_limit == 50
    assert ServiceConfig.from_env({}).adapter_mode == "merged"  # Kaito's behaviour unless asked otherwise


def test_unknown_model_and_missing_adapter_folder(tmp_path):
    from serving_bento.adapters import check_adapter_folders, resolve_base

    with pytest.raises(ConfigError, match="KAIFLOW_MODEL: unknown preset 'gpt-17'"):
        resolve_base(ServiceConfig(model="gpt-17"))
    with pytest.raises(ConfigError, match="adapter 'a': no adapter_config.json"):
        check_adapter_folders((AdapterSpec("a", str(tmp_path)),))


def test_every_setting_is_documented():
    from dataclasses import fields
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "user-guide" / "serving.md").read_text()
    missing = [f.metadata["env"] for f in fields(ServiceConfig) if f"`{f.metadata['env']}`" not in docs]
    assert not missing, f"settings missing from docs/user-guide/serving.md: {missing}"


def test_an_api_key_from_a_secret_loses_its_trailing_newline():
    """Issue 17 (Low): a Secret made from a file (``echo key > f``) ends in a newline no client sends;
    the key from the environment (the Deployment's secretKeyRef) is stripped, as the key file's is."""
    from starlette.requests import Request

    from serving_bento.app import check_api_key

    config = ServiceConfig.from_env({"KAIFLOW_API_KEY": "s3cret-key\n"})
    assert config.api_key == "s3cret-key"
    request = Request({"type": "http", "headers": [(b"authorization", b"Bearer s3cret-key")]})
    check_api_key(request, config.api_key)  # no 401
