"""Memory estimates (a GPU's, or a CPU tune's RSS), computed from a preset's architecture rather than guessed.

Inference (one replica, weights in the preset's dtype)::

    weights  = P × b_w
    kv_cache = 2 × L × H_kv × d_head × b_kv × T × B          (K and V, every layer)
    prefix   = 2 × L × H_kv × d_head × b_kv × T_p            (recent prompts' KV kept for reuse,
                                                             T_p = KAIFLOW_PREFIX_CACHE_TOKENS)
    logits   = B × V × 4                                     (last position, fp32)
    total    = (weights + kv_cache + prefix + logits) × 1.10 + 1 GiB  (allocator slack, CUDA context)

Tuning (one process: one GPU, or the CPU host; the base is frozen, only LoRA matrices train)::

    base      = P_lin × 4.127/8 + P_emb × b   (qlora: NF4 + double-quant scales; embeddings/lm_head in b)
              = P × b                         (lora)
    lora      = Σ_layers Σ_targets r × (d_in + d_out)
    trainable = lora × (4 + 4 + 8)            (fp32 weights, grads, AdamW m and v)
    acts      = (L × B × S × h × 2 + 34 × B × S × h) × b/2 (gradient checkpointing: one input per
                                                          layer, one layer recomputed at a time)
              = L × 34 × B × S × h × b/2                  (no checkpointing; Korthikanti et al.
                                                          2022, with fused/SDPA attention)
              + L' × B × S × Σ_targets d_in × (b + 1)      (LoRA dropout > 0: each adapted layer's
                                                          input copied and its mask kept; L' = L,
                                                          1 with checkpointing)
    logits    = B × S × V × 4 × 2             (fp32 logits and their gradient)
    total     = (base + trainable + acts + logits) × 1.10 + 1 GiB                 (GPU)
              = (base + trainable) × 1.10 + (acts + logits) × 1.85 + 0.85 GiB  (CPU)

b = 2 on a GPU (bf16/fp16), 4 on a CPU (fp32). B × S are the tokens of one step: with packing every
row holds S tokens, so B × S is what a step really carries. 1 GiB is the CUDA context; on a CPU
0.85 GiB is the Python process with torch, transformers, trl and peft loaded, and ×1.85 the freed
temporaries of the forward that the C allocator keeps (both measured). On a CPU the estimate is of
the process's peak RSS (``bench/tune_bench.py`` prints it beside the measured one).

P: parameters, L: layers, h: hidden size, V: vocabulary, B: batch, S: sequence length, T: context
tokens held in the KV cache, b: bytes per element. docs/reference/gpu-sizing.md compares these with the
figures Kaito publishes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from presets.catalog import Preset, generic_preset

GIB = 1024**3
CUDA_CONTEXT = 1 * GIB
# A CPU tune's process before any weights: Python, torch, transformers, trl, peft, bitsandbytes
# (RSS 0.83 GiB measured with torch 2.13, transformers 5.25, trl 1.16).
CPU_RUNTIME = int(0.85 * GIB)
# On a CPU the RSS also holds the forward's freed temporaries, which glibc keeps for reuse rather
# than returning (RSS grew ~1.8 bytes per byte saved for the backward): ×1.85 on the per-step parts,
# fitted to the peak RSS steps.tune measured for SmolLM2-135M QLoRA, one packed row of 512 tokens
# (2.40 GiB over 24 rows, 2.54 GiB over 96: bench/tune_bench.py).
CPU_ACTIVATION_SLACK = 1.85
PER_STEP_PARTS = ("activations", "logits")
DEVICES = ("cuda", "cpu")
SLACK = 1.10
NF4_BITS_PER_PARAM = 4.127  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 256 (double quant)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

DEFAULT_TUNING_BATCH = 4
DEFAULT_TUNING_SEQ = 1024
DEFAULT_LORA_R = 8
DEFAULT_INFERENCE_TOKENS = 4096
# prompt tokens whose KV the serving engine keeps for prefix reuse (KAIFLOW_PREFIX_CACHE_TOKENS' default)
PREFIX_CACHE_TOKENS = 1024
# Kaito's catalogue has no vocabulary size; the largest vocabulary among its families (Gemma,
# 262144) is assumed, so the logits and embedding terms never come out too small.
ASSUMED_VOCAB = 262_144


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int] = field(metadata={"help": "bytes per component, before slack and runtime"})
    settings: dict[str, object] = field(default_factory=dict, metadata={"help": "the inputs the estimate assumed"})

    @property
    def runtime_bytes(self) -> int:
        """What the process holds before any model: the CUDA context, or on a CPU the loaded libraries."""
        return CPU_RUNTIME if self.settings.get("device") == "cpu" else CUDA_CONTEXT

    @property
    def total_bytes(self) -> int:
        if self.settings.get("device") != "cpu":
            return int(sum(self.parts.values()) * SLACK + self.runtime_bytes)
        per_step = sum(v for k, v in self.parts.items() if k in PER_STEP_PARTS)
        rest = sum(v for k, v in self.parts.items() if k not in PER_STEP_PARTS)
        return int(rest * SLACK + per_step * CPU_ACTIVATION_SLACK + self.runtime_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        if self.settings.get("device") == "cpu":
            return (f"≈{self.total_gib:.1f} GiB of RSS ({parts} GiB; ×{CPU_ACTIVATION_SLACK} on activations and logits, "
                    f"×{SLACK} on the rest, + {CPU_RUNTIME / GIB:.2f} GiB of loaded libraries)")
        return f"≈{self.total_gib:.1f} GiB ({parts} GiB; ×{SLACK} slack + 1 GiB CUDA context)"


class UnsizedModelError(ValueError):
    """The model's architecture is not known offline (a generic HF ID): size it from config.json."""


def _require_sized(preset: Preset) -> None:
    if not preset.sized:
        raise UnsizedModelError(
            f"{preset.name}: architecture unknown offline; sizing is deferred to the steps, which read its config.json"
        )


def _vocab(preset: Preset) -> int:
    return preset.vocab_size or ASSUMED_VOCAB


def _module_shapes(preset: Preset) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear layer a LoRA target name can refer to, per family."""
    h, d = preset.hidden_size, preset.head_dim
    # Kaito's catalogue has no intermediate size; the MLP targets are then unknown (never guessed).
    inter = preset.intermediate_size or 0
    q, kv = preset.attention_heads * d, preset.kv_heads * d
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "qkv_proj": (h, q + 2 * kv),
        "query_key_value": (h, q + 2 * kv),
        "dense": (q, h),
    }
    if inter:
        shapes.update({
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
            "gate_up_proj": (h, 2 * inter),
            "dense_h_to_4h": (h, inter),
            "dense_4h_to_h": (inter, h),
        })
    return shapes


def _target_names(targets: tuple[str, ...], shapes: dict[str, tuple[int, int]]) -> list[str]:
    names: list[str] = []
    for target in targets:
        if target in shapes:
            names.append(target)
        elif any(c in target for c in "()|*\\"):  # peft gives regexes for multimodal wrappers
            names.extend(n for n in shapes if re.search(rf"\b{n}\b", target))
        else:
            raise UnsizedModelError(f"LoRA target {target!r}: its shape is unknown (no intermediate size in the catalogue)")
    return names


def lora_parameters(preset: Preset, r: int = DEFAULT_LORA_R, targets: tuple[str, ...] | None = None) -> int:
    _require_sized(preset)
    shapes = _module_shapes(preset)
    per_layer = sum(r * sum(shapes[t]) for t in _target_names(targets or preset.lora_target_modules, shapes))
    return per_layer * preset.layers


def embedding_parameters(preset: Preset) -> int:
    """Input embeddings plus the lm_head: bitsandbytes leaves both unquantised."""
    return 2 * _vocab(preset) * preset.hidden_size


def kv_bytes_per_token(preset: Preset, b: int = 2) -> int:
    """K and V of every layer; MLA models cache one compressed latent plus the rotary part."""
    if preset.kv_lora_rank:
        return (preset.kv_lora_rank + (preset.qk_rope_head_dim or 0)) * preset.layers * b
    return 2 * preset.layers * preset.kv_heads * preset.head_dim * b


def weight_bytes(preset: Preset) -> int:
    """The weights as stored (Kaito's file size when known, else parameters × dtype bytes)."""
    if preset.file_size_gib:
        return int(preset.file_size_gib * GIB)
    return preset.params * DTYPE_BYTES.get(preset.dtype, 2)


def estimate_inference(preset: Preset, tokens: int | None = None, batch: int = 1,
                       prefix_tokens: int = PREFIX_CACHE_TOKENS) -> MemoryEstimate:
    _require_sized(preset)
    tokens = tokens or min(preset.context_length, DEFAULT_INFERENCE_TOKENS)
    b = DTYPE_BYTES.get(preset.dtype, 2)
    parts = {
        "weights": weight_bytes(preset),
        "kv_cache": kv_bytes_per_token(preset, b) * tokens * batch,
        "prefix_cache": kv_bytes_per_token(preset, b) * prefix_tokens,
        "logits": batch * _vocab(preset) * 4,
    }
    settings = {"tokens": tokens, "batch": batch, "dtype": preset.dtype, "prefix_cache_tokens": prefix_tokens}
    if preset.vocab_size is None:
        settings["vocab_size_assumed"] = ASSUMED_VOCAB
    return MemoryEstimate(parts, settings)


def estimate_tuning(
    preset: Preset,
    method: str,
    batch_size: int = DEFAULT_TUNING_BATCH,
    seq_len: int = DEFAULT_TUNING_SEQ,
    lora_r: int = DEFAULT_LORA_R,
    gradient_checkpointing: bool = True,
    *,
    device: str = "cuda",
    lora_dropout: float = 0.0,
) -> MemoryEstimate:
    """One tuning process's peak memory: a GPU's (``device="cuda"``, 16-bit) or a CPU host's RSS (fp32).

    ``batch_size × seq_len`` are the tokens of one step (packed rows are full); the activations
    are those kept for the backward, with or without ``gradient_checkpointing``.
    """
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be lora or qlora (got {method!r})")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (got {device!r})")
    _require_sized(preset)
    b = 4 if device == "cpu" else 2  # bytes per weight / activation element: fp32 on a CPU, bf16/fp16 on a GPU
    emb = embedding_parameters(preset)
    if method == "qlora":
        base = int(max(preset.params - emb, 0) * NF4_BITS_PER_PARAM / 8 + emb * b)
    else:
        base = preset.params * b
    tokens = batch_size * seq_len
    h = preset.hidden_size
    if gradient_checkpointing:
        activations = (preset.layers * tokens * h * 2 + 34 * tokens * h) * b // 2
    else:
        activations = preset.layers * 34 * tokens * h * b // 2
    if lora_dropout > 0:
        shapes = _module_shapes(preset)
        inputs = sum(shapes[t][0] for t in _target_names(preset.lora_target_modules, shapes))
        layers_kept = 1 if gradient_checkpointing else preset.layers
        activations += layers_kept * tokens * inputs * (b + 1)
    parts = {
        "base_weights": base,
        "lora_trainable": lora_parameters(preset, lora_r) * 16,
        "activations": activations,
        "logits": tokens * _vocab(preset) * 4 * 2,
    }
    settings = {
        "method": method,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing,
        "device": device,
        "lora_dropout": lora_dropout,
    }
    return MemoryEstimate(parts, settings)


# -- Kaito's node estimator (pkg/workspace/estimator/nodesestimator) -------------------------------

KAITO_WEIGHT_OVERHEAD = 1.02
KAITO_USABLE_FRACTION = 0.84
KAITO_RUNTIME_RESERVE_GIB = 2.3
KAITO_ACTIVATION_FRACTION = 0.05
KAITO_KV_TOKENS = 2048
MAX_GPUS = 1024


def kaito_gpus_needed(preset: Preset, gpu_memory_gib: float) -> int:
    """GPUs Kaito's estimator asks for: the fewest n whose per-GPU budget holds 1/n of the weights.

    budget(n) = gpu × 0.84 − 2.3 GiB − 0.05 × weights/n − KV cache of 2048 tokens, with
    weights = modelFileSize × 1.02. Raises ValueError when no count up to 1024 GPUs is enough.
    """
    _require_sized(preset)
    weights = weight_bytes(preset) * KAITO_WEIGHT_OVERHEAD
    kv = kv_bytes_per_token(preset) * KAITO_KV_TOKENS
    for n in range(1, MAX_GPUS + 1):
        share = weights / n
        budget = gpu_memory_gib * GIB * KAITO_USABLE_FRACTION - KAITO_RUNTIME_RESERVE_GIB * GIB - KAITO_ACTIVATION_FRACTION * share - kv
        if budget > 0 and share <= budget:
            return n
    raise ValueError(f"{preset.name} does not fit on {MAX_GPUS} GPUs of {gpu_memory_gib} GiB")


def kaito_nodes_needed(preset: Preset, gpu_memory_gib: float, gpus_per_node: int) -> int:
    return -(-kaito_gpus_needed(preset, gpu_memory_gib) // gpus_per_node)


# -- generic HF models: sizing from config.json, at the step that downloaded it ------------------


def preset_from_config(config: dict[str, Any] | str, name: str = "model") -> Preset:
    """A sized Preset from a HuggingFace ``config.json`` (dict, JSON text or a file path).

    Multimodal wrappers keep the language model in ``text_config``. Parameters are counted from
    the shapes (embeddings, attention, MLP or experts), not read from a model card.
    """

    if isinstance(config, str):
        config = json.loads(Path(config).read_text() if not config.lstrip().startswith("{") else config)
    text = dict(config.get("text_config") or {})
    merged = {**config, **text}
    try:
        h = int(merged["hidden_size"])
        layers = int(merged["num_hidden_layers"])
        heads = int(merged["num_attention_heads"])
    except KeyError as exc:
        raise UnsizedModelError(f"{name}: config.json has no {exc.args[0]}") from None
    kv_heads = int(merged.get("num_key_value_heads") or heads)
    head = int(merged.get("head_dim") or h // heads)
    inter = int(merged.get("intermediate_size") or 4 * h)
    vocab = int(merged.get("vocab_size") or ASSUMED_VOCAB)
    experts = int(merged.get("num_local_experts") or merged.get("num_experts") or merged.get("n_routed_experts") or 0)
    mlp_inter = int(merged.get("moe_intermediate_size") or inter)
    mlp = 3 * h * mlp_inter * experts if experts else 3 * h * inter
    attention = h * heads * head * 2 + h * kv_heads * head * 2
    embeddings = vocab * h * (1 if merged.get("tie_word_embeddings") else 2)
    params = layers * (attention + mlp) + embeddings
    dtype = str(merged.get("torch_dtype") or merged.get("dtype") or "bfloat16")
    base = generic_preset(name)

    return replace(
        base, params_b=params / 1e9, dtype=dtype,
        context_length=int(merged.get("max_position_embeddings") or DEFAULT_INFERENCE_TOKENS), layers=layers,
        hidden_size=h, intermediate_size=inter, attention_heads=heads, kv_heads=kv_heads, vocab_size=vocab,
        head_size=head, kv_lora_rank=merged.get("kv_lora_rank"), qk_rope_head_dim=merged.get("qk_rope_head_dim"),
        family=str(merged.get("model_type") or "unknown"),
    )


def check_fit_from_config(config: dict[str, Any] | str, gpu_memory_gib: float, method: str | None,
                          gpus: int = 1, name: str = "model") -> str | None:
    """None when the model fits, else the arithmetic of why not (for the tune and serve steps).

    ``method`` is "lora"/"qlora" (tuning: one GPU of ``gpu_memory_gib``) or None (inference:
    sharded over ``gpus`` GPUs of one node).
    """
    preset = preset_from_config(config, name)
    estimate = estimate_tuning(preset, method) if method else estimate_inference(preset)
    usable = gpu_memory_gib * (1 if method else gpus)
    if estimate.total_bytes <= usable * GIB:
        return None
    what = f"{method} tuning on one GPU" if method else f"inference across {gpus} GPU(s)"
    return (f"{name} ({preset.params_b:.2f}B parameters from config.json) needs {estimate.describe()} for {what}, "
            f"more than the {usable:g} GiB available")
