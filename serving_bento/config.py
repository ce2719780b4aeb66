"""The service's configuration: one typed dataclass, read from environment variables.

The service runs under ``bentoml serve``, which owns the command line, so configuration comes
from the environment (a Deployment's ``env``, or what ``steps.deploy`` sets for a local run).
Each field names its variable and carries a help text; ``docs/user-guide/serving.md`` lists them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from presets.catalog import served_model_name
from presets.sizing import PREFIX_CACHE_TOKENS

QUANTIZE_MODES = ("auto", "none", "int8")


class ConfigError(ValueError):
    """A bad setting, named by its environment variable."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str = field(metadata={"help": "adapter name (the Workspace's inference.adapters[].source.name)"})
    path: str = field(metadata={"help": "folder holding adapter_config.json and the adapter weights"})
    strength: float = field(default=1.0, metadata={"help": "weight of this adapter's update (Kaito's strength)"})


@dataclass(frozen=True)
class ServiceConfig:
    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"env": "KAIFLOW_MODEL", "help": "preset name (see presets/models.yaml) or a local model folder"},
    )
    served_model_name: str = field(
        default="",
        metadata={"env": "KAIFLOW_SERVED_MODEL_NAME", "help": "model id in /v1/models; default: the preset name"},
    )
    adapters: tuple[AdapterSpec, ...] = field(
        default=(),
        metadata={
            "env": "KAIFLOW_ADAPTERS",
            "help": 'JSON list of {"name", "path", "strength"}, or a folder whose sub-folders are adapters '
            "(strength 1.0 each)",
        },
    )
    adapter_mode: str = field(
        default="merged",
        metadata={
            "env": "KAIFLOW_ADAPTER_MODE",
            "help": "merged: Kaito's behaviour, every adapter combined by strength into the one served model "
            "(default: a Workspace's inference.adapters[] means exactly that); per-request: the base and each "
            "adapter are separate models, chosen by a request's model (or /chat's adapter)",
        },
    )
    adapter_combination: str = field(
        default="cat",
        metadata={
            "env": "KAIFLOW_ADAPTER_COMBINATION",
            "help": "PEFT add_weighted_adapter method: cat (exact weighted sum, default), linear, svd",
        },
    )
    merge_adapters: bool = field(
        default=True,
        metadata={"env": "KAIFLOW_MERGE_ADAPTERS", "help": "merge the combined adapter into the base weights"},
    )
    engine: str = field(
        default="batching",
        metadata={"env": "KAIFLOW_ENGINE", "help": "batching (continuous batching) or naive (one generate at a time)"},
    )
    max_batch_size: int = field(
        default=16, metadata={"env": "KAIFLOW_MAX_BATCH_SIZE", "help": "sequences decoded together at most"}
    )
    prefix_cache_tokens: int = field(
        default=PREFIX_CACHE_TOKENS,
        metadata={
            "env": "KAIFLOW_PREFIX_CACHE_TOKENS",
            "help": "prompt tokens whose keys and values the batching engine keeps, so that a prompt sharing "
            "a prefix with a recent one (the system prompt, the conversation so far) prefills only the rest; "
            "0: off (docs/user-guide/serving.md#prefix-caching)",
        },
    )
    max_prompt_tokens: int = field(
        default=2048, metadata={"env": "KAIFLOW_MAX_PROMPT_TOKENS", "help": "longest prompt accepted (tokens)"}
    )
    max_new_tokens: int = field(
        default=512, metadata={"env": "KAIFLOW_MAX_NEW_TOKENS", "help": "largest max_tokens a request may ask for"}
    )
    max_prompt_chars: int = field(
        default=0,
        metadata={
            "env": "KAIFLOW_MAX_PROMPT_CHARS",
            "help": "longest prompt (all message contents together) accepted before tokenizing, in characters; "
            "0: 16 x KAIFLOW_MAX_PROMPT_TOKENS",
        },
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"env": "KAIFLOW_MAX_BODY_BYTES", "help": "largest request body accepted"}
    )
    api_key: str = field(
        default="",
        metadata={
            "env": "KAIFLOW_API_KEY",
            "help": "if set, requests need 'Authorization: Bearer <key>' (or use KAIFLOW_API_KEY_FILE)",
            "secret": True,
        },
    )
    device: str = field(default="auto", metadata={"env": "KAIFLOW_DEVICE", "help": "auto, cpu or cuda"})
    quantize: str = field(
        default="auto",
        metadata={
            "env": "KAIFLOW_QUANTIZE",
            "help": "base weights on a CPU: int8 (torch's dynamic int8 Linear kernels; LoRA deltas stay exact), "
            "none (fp32), or auto: int8 on a CPU, none on a GPU",
        },
    )
    torch_threads: int = field(
        default=0,
        metadata={
            "env": "KAIFLOW_TORCH_THREADS",
            "help": "CPU threads for torch's matmuls; 0 keeps torch's default (one per core). On a CPU "
            "shared with other busy processes 1 is much faster: OpenMP threads wait for each other",
        },
    )

    def __repr__(self) -> str:  # never print the key
        shown = {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
                 for f in fields(self)}
        return f"ServiceConfig({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceConfig:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            var = f.metadata["env"]
            raw = env.get(var)
            if f.name == "api_key" and raw is not None and not raw.strip():
                # an empty Secret value would otherwise switch authentication off without a word
                raise ConfigError(f"{var} is set but empty: refusing to start without the key it was meant to hold "
                                  "(unset it to serve without a key)")
            if raw is None or raw == "":
                continue
            if f.name == "api_key":
                # a Secret written with `echo key | kubectl create secret ... --from-file` ends in a
                # newline that no client sends: every request would get 401
                values["api_key"] = raw.strip()
            elif f.name == "adapters":
                values["adapters"] = parse_adapters(raw, var)
            elif f.type == "int":
                values[f.name] = _parse_int(raw, var)
            elif f.type == "bool":
                values[f.name] = _parse_bool(raw, var)
            else:
                values[f.name] = raw
        key_file = env.get("KAIFLOW_API_KEY_FILE")
        if key_file and "api_key" not in values:
            try:
                values["api_key"] = Path(key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"KAIFLOW_API_KEY_FILE: cannot read {key_file}: {exc.strerror}") from None
            if not values["api_key"]:
                raise ConfigError(f"KAIFLOW_API_KEY_FILE: {key_file} is empty: refusing to start without a key")
        config = cls(**values)  # type: ignore[arg-type]
        config.check()
        return config

    def check(self) -> None:
        if self.engine not in ("batching", "naive"):
            raise ConfigError(f"KAIFLOW_ENGINE: {self.engine!r} is not one of batching, naive")
        if self.adapter_mode not in ("merged", "per-request"):
            raise ConfigError(f"KAIFLOW_ADAPTER_MODE: {self.adapter_mode!r} is not one of merged, per-request")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"KAIFLOW_QUANTIZE: {self.quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
        if self.adapter_combination not in ("cat", "linear", "svd"):
            raise ConfigError(f"KAIFLOW_ADAPTER_COMBINATION: {self.adapter_combination!r} is not cat, linear or svd")
        for name in ("max_batch_size", "max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_env_of(name)}: must be at least 1")
        if self.max_prompt_chars < 0:
            raise ConfigError("KAIFLOW_MAX_PROMPT_CHARS: must be 0 (16 x KAIFLOW_MAX_PROMPT_TOKENS) or more")
        if self.prefix_cache_tokens < 0:
            raise ConfigError("KAIFLOW_PREFIX_CACHE_TOKENS: must be 0 (off) or more")
        if self.torch_threads < 0:
            raise ConfigError("KAIFLOW_TORCH_THREADS: must be 0 (torch's default) or more")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter names repeat: {names}")
        if self.adapter_mode == "per-request" and self.model_id() in names:
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter name {self.model_id()!r} is the base model's id; "
                              "in per-request mode every model id must be unique")

    def model_id(self) -> str:
        """The base model's id: Kaito's served name, the lowercased last part of the HF ID."""
        if self.served_model_name:
            return self.served_model_name

        return served_model_name(self.model)

    @property
    def prompt_char_limit(self) -> int:
        # a token spans a few characters on average; 16 per token leaves room for odd text (digits,
        # code, whitespace runs) while refusing megabyte prompts before any tokenizer work
        return self.max_prompt_chars or 16 * self.max_prompt_tokens


def _env_of(name: str) -> str:
    return next(f.metadata["env"] for f in fields(ServiceConfig) if f.name == name)


def _parse_int(raw: str, var: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{var}: {raw!r} is not an integer") from None


def _parse_bool(raw: str, var: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}: {raw!r} is not a boolean (true/false)")


def parse_adapters(raw: str, var: str = "KAIFLOW_ADAPTERS") -> tuple[AdapterSpec, ...]:
    """A JSON list of adapters, or a folder of adapter folders (as steps.pull_adapters writes)."""
    text = raw.strip()
    if not text.startswith("["):
        folder = Path(text)
        if not folder.is_dir():
            raise ConfigError(f"{var}: {text} is neither a JSON list nor an existing folder")
        found = sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())
        if not found:
            raise ConfigError(f"{var}: no adapter folders (with adapter_config.json) under {folder}")
        return tuple(AdapterSpec(name=p.name, path=str(p)) for p in found)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{var}: not valid JSON: {exc.msg} at position {exc.pos}") from None
    specs = []
    for i, item in enumerate(items):
        where = f"{var}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object with name, path, strength")
        unknown = set(item) - {"name", "path", "strength"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name, path, strength = item.get("name"), item.get("path"), item.get("strength", 1.0)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: expected a non-empty string")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path: expected a non-empty string")
        if isinstance(strength, str):  # Kaito writes strengths as strings ("0.5")
            try:
                strength = float(strength)
            except ValueError:
                raise ConfigError(f"{where}.strength: {strength!r} is not a number") from None
        if isinstance(strength, bool) or not isinstance(strength, int | float) or strength < 0:
            raise ConfigError(f"{where}.strength: expected a number >= 0, got {strength!r}")
        specs.append(AdapterSpec(name=name, path=path, strength=float(strength)))
    return tuple(specs)
