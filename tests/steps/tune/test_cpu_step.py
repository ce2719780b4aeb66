"""The CPU training step's parts: the compact LM head, per-example attention over packed rows, and
the memory estimate the tune prints beside the measured peak (no timing is asserted anywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from presets.catalog import get_preset
from presets.sizing import estimate_tuning
from steps.tune import TuneConfig, make_plan
from steps.tune.plan import empty_sections
from steps.tune.run import describe_step

TINY = get_preset("kaiflow-tiny-test")


@pytest.mark.parametrize("keep", [True, False])
def test_compact_head_matches_full_log_softmax(monkeypatch, keep):
    import torch

    from steps.tune import head

    monkeypatch.setattr(head, "TOKEN_CHUNK", 7)  # several token blocks
    monkeypatch.setattr(head, "KEEP_BYTES", 1 << 30 if keep else 0)  # kept probabilities, or recomputed
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (23,))
    log_prob, entropy, is_top1 = head.compact_log_prob(hidden, weight, targets)
    upstream = torch.randn(23)
    (log_prob * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.t()
    reference = logits.log_softmax(-1)
    (reference.gather(1, targets[:, None]).squeeze(1) * upstream).sum().backward()
    torch.testing.assert_close(log_prob, reference.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1))
    assert torch.equal(is_top1, logits.argmax(-1) == targets)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], weight.grad)


def tiny_model(attention: str):
    import torch
    from transformers import AutoModelForCausalLM

    from presets.materialize import resolve_model
    from steps.tune import attention as packed

    if attention == packed.NAME:
        packed.register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32, attn_implementation=attention)


def packed_row(lengths):
    import torch

    torch.manual_seed(1)
    ids = torch.randint(0, 500, (1, sum(lengths)))  # the tiny model has 506 tokens
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, dict(input_ids=ids, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                     max_length_q=max(lengths), max_length_k=max(lengths), use_cache=False)


def test_packed_attention_equals_each_example_alone_and_transformers_sdpa():
    import torch

    from steps.tune.attention import NAME

    lengths = [5, 1, 12, 9]
    ids, row = packed_row(lengths)
    packed, sdpa = tiny_model(NAME), tiny_model("sdpa")
    with torch.no_grad():
        got = packed(**row).logits
        torch.testing.assert_close(got, sdpa(**row).logits, rtol=1e-4, atol=1e-4)  # block-diagonal mask
        start = 0
        for n in lengths:  # no example sees another
            alone = sdpa(input_ids=ids[:, start:start + n], use_cache=False).logits
            torch.testing.assert_close(got[:, start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
        # without boundaries (generation, padded batches) it is transformers' SDPA
        torch.testing.assert_close(packed(input_ids=ids, use_cache=False).logits,
                                   sdpa(input_ids=ids, use_cache=False).logits)


def test_compact_head_gives_the_models_own_loss():
    import torch

    from steps.tune.head import use_compact_head

    ids, row = packed_row([6, 10, 8])
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[:, 10:13] = -100
    model = tiny_model("sdpa")
    expected = model(**row, labels=labels).loss
    assert use_compact_head(model)
    out = model(**row, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.loss, expected)
    assert int(out.label_mask.sum()) == int((labels[:, 1:] != -100).sum())
    assert (out.log_probs[~out.label_mask] == 0).all()
    out.loss.backward()
    assert model.get_output_embeddings().weight.grad is not None  # the head gets its gradient too
    assert model(**row).logits.shape[-1] == model.config.vocab_size  # plain calls are the model's own forward


def config(**flags) -> TuneConfig:
    return TuneConfig(preset=TINY.name, method="qlora", dataset_dir=Path("d"), output_dir=Path("a"),
                      checkpoint_dir=Path("c"), **flags)


def test_plan_line_names_what_a_step_carries():
    plan = make_plan(config(batch_size=2, max_length=256), TINY, empty_sections(), "cpu")
    line = describe_step(plan)
    for expected in ("2 packed rows × 256 tokens (bfd, padding-free)", "gradient checkpointing off",
                     "attention kaiflow_packed_sdpa", "dropout 0.0", "float32 compute on cpu"):
        assert expected in line
    unpacked = make_plan(config(), TINY, {**empty_sections(), "TrainingArguments": {"packing": False}}, "cpu")
    assert "no packing" in describe_step(unpacked)


def test_cpu_estimate_counts_the_activations_a_real_step_keeps():
    """The activations term against the bytes autograd really saves for one packed row (tiny model)."""
    import torch

    from steps.tune.attention import NAME
    from steps.tune.head import use_compact_head

    model = tiny_model(NAME)
    model.requires_grad_(False)
    use_compact_head(model)
    tokens = 256
    _, row = packed_row([64, 100, 92])
    labels = row["input_ids"].clone()
    saved: dict[int, int] = {}
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, target_modules=list(TINY.lora_target_modules)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**row, labels=labels, fused_lm_head=True)
    estimate = estimate_tuning(TINY, "lora", batch_size=1, seq_len=tokens, gradient_checkpointing=False, device="cpu")
    counted = estimate.parts["activations"] + estimate.parts["logits"]
    assert 0.7 * counted < sum(saved.values()) < 1.3 * counted, (sum(saved.values()), counted)
