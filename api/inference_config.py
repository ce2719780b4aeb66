"""Kaito's inference ConfigMap (``inference.config``), read for kaiflow's transformers runtime.

Kaito's ConfigMap holds ``inference_config.yaml``, whose ``vllm:`` section is passed to vLLM as
command-line flags. kaiflow serves with Transformers behind BentoML, so only the keys that mean
something there take effect:

* ``max-model-len``: the context the service admits; the prompt limit becomes
  ``max-model-len − max_new_tokens`` (the new-token limit is capped at half of it);
* ``served-model-name``: the model name clients send (first one if a list).

Every other key is reported back by name, so a user knows it is ignored rather than applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

CONFIG_KEY = "inference_config.yaml"
DEFAULT_MAX_NEW_TOKENS = 512  # serving_bento's default new-token limit
HONOURED = ("max-model-len", "served-model-name")
# The service's variable for the served name (serving_bento.config); the smoke test expects it.
SERVED_NAME_ENV = "KAIFLOW_SERVED_MODEL_NAME"


@dataclass(frozen=True)
class ServiceSettings:
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    served_model_name: str | None = None
    ignored: tuple[str, ...] = field(default=(), metadata={"help": "keys that have no effect on kaiflow's runtime"})

    def as_env(self) -> dict[str, str]:
        """The serving service's environment for these settings (serving_bento.config names)."""
        env = {}
        if self.max_prompt_tokens is not None:
            env["KAIFLOW_MAX_PROMPT_TOKENS"] = str(self.max_prompt_tokens)
        if self.max_new_tokens is not None:
            env["KAIFLOW_MAX_NEW_TOKENS"] = str(self.max_new_tokens)
        if self.served_model_name:
            env[SERVED_NAME_ENV] = self.served_model_name
        return env


def read_inference_config(config_map: dict[str, Any]) -> ServiceSettings:
    """Settings from a ConfigMap document; ValueError names the key that is wrong."""
    data = config_map.get("data") or {}
    if CONFIG_KEY not in data:
        raise ValueError(f"data.{CONFIG_KEY}: required (Kaito's inference ConfigMap key); found {sorted(data) or 'none'}")
    try:
        parsed = yaml.safe_load(data[CONFIG_KEY]) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"data.{CONFIG_KEY}: not valid YAML: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"data.{CONFIG_KEY}: must be a mapping (got {type(parsed).__name__})")
    ignored: list[str] = []
    engine: dict[str, Any] = {}
    for section, values in parsed.items():
        if section == "vllm" and isinstance(values, dict):
            engine = values
        else:
            ignored.append(str(section))
    ignored += [f"vllm.{k}" for k in engine if k not in HONOURED]
    max_len = engine.get("max-model-len")
    prompt = new = None
    if max_len is not None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"data.{CONFIG_KEY}: vllm.max-model-len must be an integer >= 2 (got {max_len!r})")
        new = min(DEFAULT_MAX_NEW_TOKENS, max_len // 2)
        prompt = max_len - new
    served = engine.get("served-model-name")
    if isinstance(served, list):
        served = served[0] if served else None
    if served is not None and not isinstance(served, str):
        raise ValueError(f"data.{CONFIG_KEY}: vllm.served-model-name must be a string (got {served!r})")
    return ServiceSettings(prompt, new, served, tuple(ignored))
