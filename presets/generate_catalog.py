"""Regenerate ``presets/catalog_models.yaml`` from Kaito's model catalogue.

    python -m presets.generate_catalog /path/to/kaito/model_catalog.yaml [presets/catalog_models.yaml]

Kaito's catalogue lists, per HuggingFace ID, the file size and the architecture numbers its node
estimator needs. kaiflow keeps its own file with the facts its sizing and tuning need, in its own
names, and derives what Kaito's data lacks (there is no network to read model cards here):

* parameters from the file size and the bytes one parameter takes in the stored format
  (``BYTES_PER_PARAM``: bf16 2, fp8 1, the 4-bit formats ~0.5 plus their scales);
* the Transformers ``model_type`` from the architecture class name, through Transformers' own
  auto-model tables;
* default LoRA target modules from peft's per-architecture table
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``); a model peft has no default for, or
  whose weights are stored pre-quantised, is marked not tunable.

Kaito's legacy short names are part of its public behaviour, not of that file; they live in
``LEGACY_NAMES`` below, and a test checks each maps to a catalogue entry. Transformers and peft are
imported only here, never when kaiflow reads the catalogue.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

# Kaito's 25 legacy preset names and the HF ID each resolves to (its plugin registry).
LEGACY_NAMES = {
    "phi-4": "microsoft/phi-4",
    "phi-4-mini-instruct": "microsoft/phi-4-mini-instruct",
    "phi-3-mini-4k-instruct": "microsoft/phi-3-mini-4k-instruct",
    "phi-3-mini-128k-instruct": "microsoft/phi-3-mini-128k-instruct",
    "phi-3-medium-4k-instruct": "microsoft/phi-3-medium-4k-instruct",
    "phi-3-medium-128k-instruct": "microsoft/phi-3-medium-128k-instruct",
    "phi-3.5-mini-instruct": "microsoft/phi-3.5-mini-instruct",
    "llama-3.1-8b-instruct": "meta-llama/llama-3.1-8b-instruct",
    "llama-3.3-70b-instruct": "meta-llama/llama-3.3-70b-instruct",
    "deepseek-r1-distill-llama-8b": "deepseek-ai/deepseek-r1-distill-llama-8b",
    "deepseek-r1-distill-qwen-14b": "deepseek-ai/deepseek-r1-distill-qwen-14b",
    "deepseek-r1-0528": "deepseek-ai/deepseek-r1-0528",
    "deepseek-v3-0324": "deepseek-ai/deepseek-v3-0324",
    "qwen2.5-coder-7b-instruct": "qwen/qwen2.5-coder-7b-instruct",
    "qwen2.5-coder-32b-instruct": "qwen/qwen2.5-coder-32b-instruct",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "gemma-3-4b-instruct": "google/gemma-3-4b-it",
    "gemma-3-27b-instruct": "google/gemma-3-27b-it",
    "mistral-7b": "mistralai/mistral-7b-v0.3",
    "mistral-7b-instruct": "mistralai/mistral-7b-instruct-v0.3",
    "ministral-3-3b-instruct": "mistralai/ministral-3-3b-instruct-2512",
    "ministral-3-8b-instruct": "mistralai/ministral-3-8b-instruct-2512",
    "ministral-3-14b-instruct": "mistralai/ministral-3-14b-instruct-2512",
    "mistral-large-3-675b-instruct": "mistralai/mistral-large-3-675b-instruct-2512",
}

# Bytes per parameter in the stored checkpoint, by Kaito's quantMethod (None: bf16/fp16). The
# 4-bit formats carry per-group scales and leave embeddings and norms in 16 bits: ~0.55 B/param.
BYTES_PER_PARAM = {
    None: 2.0,
    "fp8": 1.0,
    "float-quantized": 1.0,
    "mxfp4": 0.55,
    "nvfp4-pack-quantized": 0.55,
    "pack-quantized": 0.55,
    "awq": 0.55,
    "gptq": 0.55,
    "MIXED_PRECISION": 0.55,
}

GIB = 1024**3

# Parameter counts the file size cannot give: gpt-oss stores only its MoE experts in mxfp4 (the
# attention, embeddings and router stay bf16), so size / 0.55 overstated 20b as 50 B. Totals from
# OpenAI's gpt-oss model card.
PARAMS_B = {
    "openai/gpt-oss-20b": 20.91,
    "openai/gpt-oss-120b": 116.83,
}


def _size_gib(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(Gi|Mi|Ti)", str(text).strip())
    if not match:
        raise ValueError(f"modelFileSize {text!r} is not a Gi/Mi/Ti quantity")
    return float(match[1]) * {"Mi": 1 / 1024, "Gi": 1.0, "Ti": 1024.0}[match[2]]


def _model_types() -> dict[str, set[str]]:
    from transformers.models.auto import modeling_auto

    owners: dict[str, set[str]] = {}
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES"):
            for model_type, classes in getattr(modeling_auto, attr).items():
                for cls in classes if isinstance(classes, list | tuple) else [classes]:
                    owners.setdefault(cls, set()).add(model_type)
    return owners


def _model_type(architecture: str, owners: dict[str, set[str]]) -> str | None:
    """The model_type whose name is the class name's prefix (``Qwen3_5MoeFor...`` -> qwen3_5_moe)."""
    prefix = re.split(r"For(CausalLM|ConditionalGeneration)$", architecture)[0].lower().replace("_", "")
    for candidate in sorted(owners.get(architecture, ())):
        if candidate.replace("_", "") == prefix:
            return candidate
    return None


def build(kaito_catalog: dict[str, Any]) -> dict[str, Any]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

    owners = _model_types()
    models: dict[str, Any] = {}
    for entry in kaito_catalog["models"]:
        quant = entry.get("quantMethod")
        if quant not in BYTES_PER_PARAM:
            raise ValueError(f"{entry['name']}: no bytes-per-parameter figure for quantMethod {quant!r}")
        size_gib = _size_gib(entry["modelFileSize"])
        architecture = entry["architectures"][0]
        model_type = _model_type(architecture, owners)
        targets = LORA_TARGETS.get(model_type) if model_type else None
        if isinstance(targets, str):  # peft gives a regex for multimodal wrappers
            targets = [targets]
        facts: dict[str, Any] = {
            "file_size_gib": round(size_gib, 2),
            "params_b": PARAMS_B.get(entry["name"], round(size_gib * GIB / BYTES_PER_PARAM[quant] / 1e9, 2)),
            "architecture": architecture,
            "model_type": model_type,
            "quantization": quant,
            "context_length": int(entry["modelTokenLimit"]),
            "layers": int(entry["numHiddenLayers"]),
            "hidden_size": int(entry["hiddenSize"]),
            "attention_heads": int(entry["numAttentionHeads"]),
            "kv_heads": int(entry["numKeyValueHeads"]),
            "head_dim": int(entry.get("headDim") or entry["hiddenSize"] // entry["numAttentionHeads"]),
        }
        if entry.get("kvLoraRank"):
            facts["kv_lora_rank"] = int(entry["kvLoraRank"])
            facts["qk_rope_head_dim"] = int(entry.get("qkRopeHeadDim") or 64)
        facts["lora_target_modules"] = list(targets or [])
        facts["tuning"] = bool(targets) and quant is None
        models[entry["name"]] = facts
    return {"legacy_names": dict(LEGACY_NAMES), "models": models}


HEADER = """\
# Generated by `python -m presets.generate_catalog <kaito>/model_catalog.yaml`: do not edit.
# Facts per HuggingFace model from Kaito's catalogue (file size, architecture numbers), with
# params_b derived from the file size and the storage format, model_type from Transformers' auto
# classes and lora_target_modules from peft's per-architecture defaults (empty: peft has none,
# so kaiflow cannot tune it). legacy_names: Kaito's short preset names, lowercased.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(args[0])
    target = Path(args[1]) if len(args) > 1 else Path(__file__).with_name("catalog_models.yaml")
    data = build(yaml.safe_load(source.read_text()))
    target.write_text(HEADER + yaml.safe_dump(data, sort_keys=False, width=120))
    print(f"wrote {len(data['models'])} models, {len(data['legacy_names'])} legacy names to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
