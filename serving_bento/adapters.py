"""Loading the base model and combining the Workspace's adapters, each with its strength.

How adapters are combined
-------------------------
Kaito's transformers runtime loads every adapter of ``inference.adapters[]`` and folds them into
one with PEFT's ``add_weighted_adapter``. We do the same, with the ``cat`` method by default:

* ``cat`` concatenates the adapters' A and B matrices (B scaled by each weight), so the combined
  update is exactly ``sum_i strength_i * B_i A_i * scaling_i``: each adapter contributes its own
  update, scaled by its strength, whatever the ranks. It is exact and cheap.
* ``linear`` adds the A matrices and the B matrices separately (each times ``sqrt(weight)``).
  For one adapter that is exactly a rescale (measured: ``linear`` at 0.5 equals
  ``rescale_adapter_scale(0.5)``), but for two or more it creates cross terms ``B_i A_j`` that
  neither adapter learned, and it needs equal ranks.
* ``svd`` recomputes a low-rank factorisation of the exact sum: exact only up to the chosen rank
  and slow (~6 s per adapter on the test machine).

Adapters are fixed for the life of a pod (a new Workspace spec rolls a new Deployment), so by
default the combined adapter is merged into the base weights (``merge_and_unload``): decoding then
runs at base-model speed (14 vs 10-13 tok/s unmerged for SmolLM2 on a CPU).

Adapters as separate models (``KAIFLOW_ADAPTER_MODE=per-request``)
-------------------------------------------------------------------
Every adapter is loaded with PEFT, its LoRA scaling multiplied by its strength
(``LoraLayer.set_scale``: the update becomes ``strength * B A * alpha / r``, the same update the
merged mode adds for that adapter). Then each adapted ``Linear`` is replaced by a
:class:`MultiLoraLinear` holding every adapter's A side by side (``[in, adapters * r]``) and every
B stacked (``[adapters * r, out]``, scaling and strength folded in), and an :class:`AdapterRouter`
tells all of them which adapter each row of the batch uses. A layer computes
``base(x) + ((x @ A) * mask) @ B``: one dense matmul over the adapters present in the batch, a
per-row 0/1 mask that keeps only the columns of the row's own adapter (a base-model row keeps
none), one dense matmul back. Each adapter's weights are read once per step however many rows use
it; the A/B columns of the adapters present and the masks are cached until the batch's
composition changes, which in decoding is rare. The update is each adapter's own ``x A B`` in the
weights' dtype (fp32 on a CPU, also around an int8 base), up to rounding.

Measured (SmolLM2-135M, 4 adapters of rank 8 on all 7 projections, int8 base, 1 thread, decode
steps timed in CPU time beside the merged model in one process, shared 2-core machine): this
costs as much as the former per-row gathered ``bmm(bmm(x, A[rows]), B[rows])`` at batch 8 (both
0.80-0.83 of the merged model's speed) and less at batch 16 (0.81 against 0.75), where the gathered
copies read each adapter's weights once per row. What remains is about two small matmuls per
projection (~4 ms of a ~32 ms step at batch 8) and the ~39 MB of fp32 A/B they read per step;
none of these was faster: one matmul for q/k/v's A (and gate/up's) 0.79, bf16 stacks slower still,
fbgemm's fp16-weight kernel (not exact) 0.82.

Why not PEFT's own mixed batches (``adapter_names=[...]`` in ``forward``, which also works): it
splits the batch per adapter in every LoRA layer (index, two matmuls, scale, scatter-add per
adapter per layer, plus Python checks). Measured on SmolLM2 (batch 8, 4 adapters, r=8 on all 7
projections, 1 CPU thread, shared machine): a decode step took 0.71 s with PEFT's mixed batch
against 0.38-0.44 s for the merged model.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from presets.catalog import UnknownPresetError, get_preset
from presets.materialize import CHATML_TEMPLATE, resolve_model
from serving_bento.config import AdapterSpec, ConfigError, ServiceConfig

log = logging.getLogger("kaiflow.serving.adapters")

COMBINED_ADAPTER = "kaiflow-combined"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    context_length: int
    chat_template: str  # "native", "chatml" or "none"
    adapters: tuple[AdapterSpec, ...]
    router: AdapterRouter | None = None  # per-request mode: the adapters a request may choose

    @property
    def per_request_adapters(self) -> tuple[str, ...]:
        return self.router.names if self.router else ()


def resolve_base(config: ServiceConfig) -> tuple[str, int | None, str]:
    """(what from_pretrained takes, the preset's context length or None, chat template mode)."""

    if Path(config.model).is_dir():
        return config.model, None, "native"
    try:
        preset = get_preset(config.model)
    except UnknownPresetError as exc:
        raise ConfigError(f"KAIFLOW_MODEL: {exc} (and no folder of that name exists)") from None
    return resolve_model(preset), preset.context_length, preset.chat_template


def check_adapter_folders(adapters: tuple[AdapterSpec, ...]) -> None:
    for spec in adapters:
        config_file = Path(spec.path) / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter {spec.name!r}: no adapter_config.json in {spec.path}")
        try:
            json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"KAIFLOW_ADAPTERS: adapter {spec.name!r}: {config_file} is not JSON: {exc.msg}") from None


def load_model(config: ServiceConfig) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    check_adapter_folders(config.adapters)
    source, preset_context, template_mode = resolve_base(config)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # V100 and T4 have no bf16: serve in fp16 there
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    quantize = resolve_quantize(config, device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    router = None
    if config.adapters and config.adapter_mode == "per-request":
        model, router = load_separate_adapters(model, config.adapters)
    elif config.adapters:
        model = apply_adapters(model, config.adapters, config.adapter_combination, merge=config.merge_adapters)
    model.eval()
    if quantize == "int8":  # after merging (the merged deltas are quantized with the base), or around the
        # per-request stacks (their A and B stay fp32: every adapter's delta exact)
        quantize_int8(model, tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids)
    if template_mode == "chatml" or (template_mode == "native" and not tokenizer.chat_template):
        tokenizer.chat_template = CHATML_TEMPLATE
        template_mode = "chatml"
    context = preset_context or getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(model, tokenizer, int(context), template_mode, config.adapters, router)


def resolve_quantize(config: ServiceConfig, device: str) -> str:
    """The quantization a service on ``device`` uses: ``none`` or ``int8`` (see :func:`quantize_int8`)."""
    unmerged = bool(config.adapters) and config.adapter_mode == "merged" and not config.merge_adapters
    if config.quantize == "auto":
        return "int8" if device == "cpu" and not unmerged and _int8_kernels_available() else "none"
    if config.quantize == "int8":
        if device != "cpu":  # torch's dynamic int8 Linear (fbgemm/onednn/qnnpack) has no CUDA kernels
            raise ConfigError(f"KAIFLOW_QUANTIZE=int8 runs on a CPU only; this service runs on {device} "
                              "(use auto or none)")
        if unmerged:
            raise ConfigError("KAIFLOW_QUANTIZE=int8 needs merged adapters (KAIFLOW_MERGE_ADAPTERS=true) or "
                              "KAIFLOW_ADAPTER_MODE=per-request: PEFT's unmerged LoRA layers need a float base layer")
        if not _int8_kernels_available():
            raise ConfigError("KAIFLOW_QUANTIZE=int8: this torch build has no quantized CPU engine")
    return config.quantize


def _int8_kernels_available() -> bool:
    import torch

    return any(engine in torch.backends.quantized.supported_engines for engine in ("fbgemm", "x86", "onednn", "qnnpack"))


# Linear layers kept in fp32 under int8 when nothing is known about the model's activations: the
# MLP's down projection. Its input (SwiGLU's output) has outliers that a per-batch activation scale
# flattens: on SmolLM2, quantizing down_proj alone raised held-out loss from 3.84 to 4.62; every other
# projection together to 4.08 (docs/user-guide/serving.md).
KEEP_FP32 = frozenset({"down_proj"})
# With a calibration pass, only the down projections whose input has such outliers stay fp32: a
# feature more than OUTLIER_RATIO times the layer's median feature magnitude. On SmolLM2-135M that is
# 9 of 30 layers (peak features 24x to 4,900x the median, layer 11 the most; the others 18x or
# less); the other 21 run in int8.
OUTLIER_RATIO = 20.0
CALIBRATION_TEXT = (
    "The committee met on Tuesday to discuss the budget for next year. Several members argued that the "
    "library needed new computers, while others wanted to repair the roof of the sports hall first. After a "
    "long debate they agreed to split the money between the two.\nQuestion: Write a short poem about the sea."
    "\nAnswer: The waves roll in, the gulls cry out, the tide comes round again.\nQuestion: Explain how "
    "photosynthesis works in two sentences.\nAnswer: Plants capture light with chlorophyll and use its energy "
    "to turn water and carbon dioxide into sugar and oxygen."
)


def _role(name: str) -> str:
    """``q_proj``, ``down_proj``, ``lm_head``...: a Linear's role, also as a MultiLoraLinear's ``base``."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "base" and len(parts) > 1 else parts[-1]


def outlier_layers(model: Any, calibration_ids: Any, ratio: float = OUTLIER_RATIO) -> set[str]:
    """The ``down_proj`` Linear layers whose input, over ``calibration_ids``, has a feature whose
    largest magnitude is more than ``ratio`` times the median feature's (one forward pass)."""
    import torch
    from torch import nn

    peaks: dict[str, Any] = {}

    def watch(name: str):
        def hook(_module: Any, inputs: tuple) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x
        return hook

    handles = [module.register_forward_pre_hook(watch(name)) for name, module in model.named_modules()
               if type(module) is nn.Linear and _role(name) == "down_proj"]
    try:
        with torch.inference_mode():
            model(calibration_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return {name for name, peak in peaks.items() if float(peak.max()) > ratio * max(float(peak.median()), 1e-6)}


def quantize_int8(model: Any, calibration_ids: Any = None) -> list[str]:
    """Swap the model's float ``nn.Linear`` layers for torch's dynamic int8 Linear, but for those that stay fp32.

    Weights become int8 with one scale per output channel (a quarter of the bytes to read per
    token); activations are quantized per call. Stay fp32: with ``calibration_ids`` (token ids of
    a calibration text, run through the model once), the down projections of
    :func:`outlier_layers`; without, every :data:`KEEP_FP32` layer. A :class:`MultiLoraLinear`'s
    base layer is quantized, its stacked A and B stay fp32, so each adapter's delta is computed
    exactly. Returns the names of the quantized layers.
    """

    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    kept = outlier_layers(model, calibration_ids) if calibration_ids is not None else None
    spec = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or "lora_" in name:  # subclasses (LoRA's own layers) are not ours to swap
            continue
        if (name in kept) if kept is not None else (_role(name) in KEEP_FP32):
            continue
        spec[name] = per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch's "migrate to torchao" notice, printed on every call
        warnings.simplefilter("ignore")
        quantize_dynamic(model, spec, inplace=True)
    if kept is None:
        log.info("int8 weights for %d Linear layers (kept fp32: %s)", len(spec), ", ".join(sorted(KEEP_FP32)))
    else:
        log.info("int8 weights for %d Linear layers; kept fp32 for outliers in their input: %s", len(spec),
                 ", ".join(sorted(kept)) or "none")
    return sorted(spec)


def _load_all(model: Any, adapters: tuple[AdapterSpec, ...]) -> Any:
    from peft import PeftModel

    first, *rest = adapters
    try:
        peft_model = PeftModel.from_pretrained(model, first.path, adapter_name=first.name)
        for spec in rest:
            peft_model.load_adapter(spec.path, adapter_name=spec.name)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ConfigError(f"KAIFLOW_ADAPTERS: cannot load an adapter onto this base model: {exc}") from None
    return peft_model


class AdapterRouter:
    """Which adapter each row of the next forward pass uses, shared by every :class:`MultiLoraLinear`.

    Besides the rows it keeps what every layer derives from them, once per batch composition: the
    adapters present in the batch (``present``, changing only when an adapter joins or leaves
    the batch) and, per LoRA rank, the mask that keeps each row's own adapter's columns.
    """

    def __init__(self, names: tuple[str, ...], device: Any):
        self.names = names
        self._index = {name: i + 1 for i, name in enumerate(names)}  # 0: the base model
        self.device = device
        self.rows: Any = None  # LongTensor [batch] of adapter indices; None: every row is the base model
        self.version = 0  # changes with the rows
        self.present: tuple[int, ...] = ()  # adapter indices (1-based) used by some row, ascending
        self.present_version = 0  # changes with ``present``
        self._last: tuple[int, ...] = ()
        self._masks: dict[int, Any] = {}

    def select(self, adapters: list[str | None]) -> None:
        import torch

        key = tuple(self._index[a] if a is not None else 0 for a in adapters)
        if key == self._last:
            return
        self._last = key
        self.rows = torch.tensor(key, dtype=torch.long, device=self.device) if any(key) else None
        self.version += 1
        self._masks = {}
        present = tuple(sorted(set(key) - {0}))
        if present != self.present:
            self.present = present
            self.present_version += 1

    def mask(self, rank: int, dtype: Any) -> Any:
        """[batch, 1, len(present) * rank]: 1 where a column belongs to the row's adapter, else 0."""
        import torch

        mask = self._masks.get(rank)
        if mask is None or mask.dtype != dtype:
            owner = torch.tensor(self.present, dtype=torch.long, device=self.device).repeat_interleave(rank)
            mask = (owner[None, :] == self.rows[:, None]).to(dtype)[:, None, :]
            self._masks[rank] = mask
        return mask


def _multi_lora_linear_class() -> type:
    import torch
    from torch import nn

    class MultiLoraLinear(nn.Module):
        """A Linear plus one LoRA update per row, chosen by the router (see the module docstring)."""

        def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, router: AdapterRouter):
            """``a`` [adapters, in, r] and ``b`` [adapters, r, out], in the router's order."""
            super().__init__()
            self.base = base
            self.rank = a.shape[2]
            # every adapter's A side by side and every B stacked (adapter i: columns / rows
            # (i-1)*rank ... i*rank - 1); scaling and strength folded into B
            self.register_buffer("a", a.permute(1, 0, 2).reshape(a.shape[1], -1).contiguous())  # [in, n*r]
            self.register_buffer("b", b.reshape(-1, b.shape[2]).contiguous())  # [n*r, out]
            self.router = router
            self._cached_version = -1
            self._a_present: Any = None
            self._b_present: Any = None

        def adapter_weights(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Adapter ``index``'s (1-based, as the router numbers them) A [in, r] and B [r, out]."""
            columns = slice((index - 1) * self.rank, index * self.rank)
            return self.a[:, columns], self.b[columns]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.base(x)
            router = self.router
            if router.rows is None:
                return out
            if self._cached_version != router.present_version:  # the adapters in the batch changed
                present, r = router.present, self.rank
                if len(present) * r == self.a.shape[1]:  # all of them: no copy
                    self._a_present, self._b_present = self.a, self.b
                else:
                    columns = torch.cat([torch.arange((i - 1) * r, i * r) for i in present]).to(self.a.device)
                    self._a_present, self._b_present = self.a[:, columns], self.b[columns]
                self._cached_version = router.present_version
            # x @ A of every adapter in the batch, each row keeping only its adapter's columns, @ B
            h = torch.matmul(x.to(self.a.dtype), self._a_present)
            mask = router.mask(self.rank, h.dtype)
            h.mul_(mask if h.dim() == 3 else mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[2]))
            if not out.is_contiguous():
                out = out.contiguous()
            flat = out.view(-1, out.shape[-1])
            h = h.view(-1, h.shape[-1])
            if flat.dtype == h.dtype:
                flat.addmm_(h, self._b_present)
            else:
                flat.add_(torch.mm(h, self._b_present).to(flat.dtype))
            return out

    return MultiLoraLinear


def load_separate_adapters(model: Any, adapters: tuple[AdapterSpec, ...]) -> tuple[Any, AdapterRouter]:
    """Every adapter at its strength, for requests to choose one per row; the model and its router."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    peft_model = _load_all(model, adapters)
    names = tuple(a.name for a in adapters)
    stacks: dict[str, tuple[Any, Any]] = {}
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear) or any(module.use_dora.get(n, False) for n in names) or \
                module.lora_variant:
            raise ConfigError(f"KAIFLOW_ADAPTERS: {module_name} is not a plain LoRA Linear layer (DoRA, embedding "
                              "or convolution LoRA): per-request adapters support plain LoRA on Linear layers; "
                              "use KAIFLOW_ADAPTER_MODE=merged")
        for spec in adapters:
            module.set_scale(spec.name, spec.strength)
        base = module.get_base_layer()
        rank = max(module.r.get(n, 0) for n in names)
        weight = base.weight
        a = torch.zeros(len(names), base.in_features, rank, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(len(names), rank, base.out_features, dtype=weight.dtype, device=weight.device)
        for i, name in enumerate(names):
            if name not in module.lora_A:  # this adapter does not touch this layer
                continue
            r = module.r[name]
            a[i, :, :r] = module.lora_A[name].weight.detach().T.to(weight.dtype)
            b[i, :r, :] = (module.lora_B[name].weight.detach().T * module.scaling[name]).to(weight.dtype)
        stacks[module_name] = (a, b)
    base_model = peft_model.unload()
    router = AdapterRouter(names, next(base_model.parameters()).device)
    multi = _multi_lora_linear_class()
    for module_name, (a, b) in stacks.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = base_model.get_submodule(parent_name)
        setattr(parent, child, multi(getattr(parent, child), a, b, router))
    log.info("serving adapters %s separately at strengths %s (%d layers)", list(names),
             [a.strength for a in adapters], len(stacks))
    return base_model, router


def apply_adapters(model: Any, adapters: tuple[AdapterSpec, ...], combination: str = "cat", merge: bool = True) -> Any:
    """Load every adapter, fold them into one weighted adapter, optionally merge it into the base."""
    peft_model = _load_all(model, adapters)
    names = [a.name for a in adapters]
    weights = [a.strength for a in adapters]
    method = combination
    if len(adapters) == 1 and method == "cat":
        method = "linear"  # one adapter: linear is an exact rescale and keeps the rank
    peft_model.add_weighted_adapter(names, weights, adapter_name=COMBINED_ADAPTER, combination_type=method)
    peft_model.set_adapter(COMBINED_ADAPTER)
    for name in names:
        peft_model.delete_adapter(name)
    log.info("combined adapters %s with strengths %s (%s)", names, weights, method)
    return peft_model.merge_and_unload() if merge else peft_model
