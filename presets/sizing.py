"""GPU memory estimates, computed from a preset's architecture rather than guessed.

Inference (one replica, weights in the preset's dtype)::

    weights  = P × b_w
    kv_cache = 2 × L × H_kv × d_head × b_kv × T × B          (K and V, every layer)
    logits   = B × V × 4                                     (last position, fp32)
    total    = (weights + kv_cache + logits) × 1.10 + 1 GiB  (allocator slack, CUDA context)

Tuning (one GPU; the base is frozen, only LoRA matrices train)::

    base      = P_lin × 4.127/8 + P_emb × 2   (qlora: NF4 + double-quant scales; embeddings/lm_head bf16)
              = P × 2                         (lora: bf16 base)
    lora      = Σ_layers Σ_targets r × (d_in + d_out)
    trainable = lora × (4 + 4 + 8)            (fp32 weights, grads, AdamW m and v)
    acts      = L × B × S × h × 2 + 34 × B × S × h         (gradient checkpointing: one input per
                                                          layer, one layer recomputed at a time)
              = L × 34 × B × S × h                        (no checkpointing; Korthikanti et al.
                                                          2022, with fused/SDPA attention)
    logits    = B × S × V × 4 × 2             (fp32 logits and their gradient)
    total     = (base + trainable + acts + logits) × 1.10 + 1 GiB

P: parameters, L: layers, h: hidden size, V: vocabulary, B: batch, S: sequence length, T: context
tokens held in the KV cache, b: bytes per element. docs/gpu-sizing.md compares these with the
figures Kaito publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from presets.catalog import Preset

GIB = 1024**3
CUDA_CONTEXT = 1 * GIB
SLACK = 1.10
NF4_BITS_PER_PARAM = 4.127  # 4-bit codes + 8-bit absmax per 64 + fp32 scale per 256 (double quant)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

DEFAULT_TUNING_BATCH = 4
DEFAULT_TUNING_SEQ = 1024
DEFAULT_LORA_R = 8
DEFAULT_INFERENCE_TOKENS = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int] = field(metadata={"help": "bytes per component, before slack and CUDA context"})
    settings: dict[str, object] = field(default_factory=dict, metadata={"help": "the inputs the estimate assumed"})

    @property
    def total_bytes(self) -> int:
        return int(sum(self.parts.values()) * SLACK + CUDA_CONTEXT)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        return f"≈{self.total_gib:.1f} GiB ({parts} GiB; ×{SLACK} slack + 1 GiB CUDA context)"


def _module_shapes(preset: Preset) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear layer a LoRA target name can refer to, per family."""
    h, inter, d = preset.hidden_size, preset.intermediate_size, preset.head_dim
    q, kv = preset.attention_heads * d, preset.kv_heads * d
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
        "qkv_proj": (h, q + 2 * kv),
        "gate_up_proj": (h, 2 * inter),
        "query_key_value": (h, q + 2 * kv),
        "dense": (q, h),
        "dense_h_to_4h": (h, inter),
        "dense_4h_to_h": (inter, h),
    }


def lora_parameters(preset: Preset, r: int = DEFAULT_LORA_R, targets: tuple[str, ...] | None = None) -> int:
    shapes = _module_shapes(preset)
    per_layer = sum(r * sum(shapes[t]) for t in (targets or preset.lora_target_modules))
    return per_layer * preset.layers


def embedding_parameters(preset: Preset) -> int:
    """Input embeddings plus the lm_head: bitsandbytes leaves both unquantised."""
    return 2 * preset.vocab_size * preset.hidden_size


def estimate_inference(preset: Preset, tokens: int | None = None, batch: int = 1) -> MemoryEstimate:
    tokens = tokens or min(preset.context_length, DEFAULT_INFERENCE_TOKENS)
    b = DTYPE_BYTES.get(preset.dtype, 2)
    parts = {
        "weights": preset.params * b,
        "kv_cache": 2 * preset.layers * preset.kv_heads * preset.head_dim * b * tokens * batch,
        "logits": batch * preset.vocab_size * 4,
    }
    return MemoryEstimate(parts, {"tokens": tokens, "batch": batch, "dtype": preset.dtype})


def estimate_tuning(
    preset: Preset,
    method: str,
    batch_size: int = DEFAULT_TUNING_BATCH,
    seq_len: int = DEFAULT_TUNING_SEQ,
    lora_r: int = DEFAULT_LORA_R,
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be lora or qlora (got {method!r})")
    emb = embedding_parameters(preset)
    if method == "qlora":
        base = int(max(preset.params - emb, 0) * NF4_BITS_PER_PARAM / 8 + emb * 2)
    else:
        base = preset.params * 2
    tokens = batch_size * seq_len
    h = preset.hidden_size
    if gradient_checkpointing:
        activations = preset.layers * tokens * h * 2 + 34 * tokens * h
    else:
        activations = preset.layers * 34 * tokens * h
    parts = {
        "base_weights": base,
        "lora_trainable": lora_parameters(preset, lora_r) * 16,
        "activations": activations,
        "logits": tokens * preset.vocab_size * 4 * 2,
    }
    settings = {
        "method": method,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing,
    }
    return MemoryEstimate(parts, settings)
