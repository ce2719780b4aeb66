"""The LM head and loss on CPU: only the positions that have a label, no recomputation.

trl's SFTTrainer asks the model for ``fused_lm_head=True`` outputs (per-token log-probabilities,
entropy, top-1) from ``trl.trainer.utils.add_fused_lm_head``. Off CUDA that head scores *every*
position — prompt tokens too, whose labels are -100 — in 32k-wide vocabulary tiles folded with
element-wise torch ops, and its backward runs the ``hidden × vocab`` matmul a second time. On a CPU
that was 43 % of a QLoRA step of SmolLM2-135M (profiled: 1.6 s of 3.8 s for 511 packed tokens).

``use_compact_head`` replaces it, on CPU only, with ``compact_log_prob``: the hidden states of the
labelled positions alone (assistant tokens for chat rows) go through the head once; their
probabilities are kept for the backward, which is then one matmul. Same outputs, same loss: the
log-probability of each label, the entropy and top-1 for trl's metrics, zero where the label is
-100. The probabilities kept are ``labelled tokens × vocabulary × 4`` bytes (49k vocabulary: 0.19
MiB a token); above ``KEEP_BYTES`` the backward recomputes them in ``TOKEN_CHUNK`` blocks instead.
"""

from __future__ import annotations

import types

TOKEN_CHUNK = 1024  # rows of logits computed at once (a 49k vocabulary: 192 MiB of fp32)
KEEP_BYTES = 512 * 2**20  # probabilities kept for the backward up to this size, else recomputed


def _chunk_stats(hidden, weight, targets):
    """(log p(target), entropy, is_top1, probabilities) of one block of rows, fp32."""
    import torch

    logits = hidden.float() @ weight.float().t()  # [n, V]
    target = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    # max returns the first maximum, as trl's metric: a tie with an earlier token is not a top-1 prediction
    peak, first = logits.max(1)
    is_top1 = first == targets
    logits.sub_(peak.unsqueeze(1))  # z - max
    probs = logits.exp()
    total = probs.sum(1)
    # sum_v p_v (z_v - max), a batched dot product: no third [n, V] buffer
    weighted = torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1) / total
    del logits
    log_total = total.log()
    log_prob = target - peak - log_total
    entropy = log_total - weighted
    probs.div_(total.unsqueeze(1))
    return log_prob, entropy, is_top1, probs


def compact_log_prob(hidden, weight, targets):
    """``(log_prob, entropy, is_top1)``, each [n], of ``hidden [n, H] @ weight [V, H].T`` at ``targets [n]``.

    Differentiable in ``log_prob`` (towards ``hidden`` and, when it requires grad, ``weight``).
    """
    return _function().apply(hidden, weight, targets)


_FUNCTION = None


def _function():
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    import torch

    class _CompactLogProb(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            n, vocab = hidden.shape[0], weight.shape[0]
            keep = n * vocab * 4 <= KEEP_BYTES
            parts, kept = [], []
            for start in range(0, n, TOKEN_CHUNK):
                end = min(start + TOKEN_CHUNK, n)
                log_prob, entropy, is_top1, probs = _chunk_stats(hidden[start:end], weight, targets[start:end])
                parts.append((log_prob, entropy, is_top1))
                kept.append(probs if keep else None)
                del probs
            log_prob, entropy, is_top1 = (torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts, strict=True))
            ctx.kept = kept
            ctx.save_for_backward(hidden, weight, targets)
            ctx.mark_non_differentiable(entropy, is_top1)
            return log_prob.to(hidden.dtype), entropy.to(hidden.dtype), is_top1

        @staticmethod
        def backward(ctx, grad_log_prob, _grad_entropy, _grad_top1):
            hidden, weight, targets = ctx.saved_tensors
            kept, ctx.kept = ctx.kept, None  # the buffers are reused in place: one backward only
            need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            if grad_log_prob is None:
                return (torch.zeros_like(hidden) if need_hidden else None,
                        grad_weight.to(weight.dtype) if need_weight else None, None)
            w = weight.float()
            for index, start in enumerate(range(0, hidden.shape[0], TOKEN_CHUNK)):
                end = min(start + TOKEN_CHUNK, hidden.shape[0])
                probs = kept[index]
                if probs is None:
                    probs = _chunk_stats(hidden[start:end], weight, targets[start:end])[3]
                kept[index] = None
                g = grad_log_prob[start:end].float()
                # d log p(t) / d z = onehot(t) - p
                grad_logits = probs.mul_(-g.unsqueeze(1))
                grad_logits.scatter_add_(1, targets[start:end].unsqueeze(1), g.unsqueeze(1))
                if need_hidden:
                    grad_hidden[start:end] = (grad_logits @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), hidden[start:end].float())
                del probs, grad_logits
            return grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None

    _FUNCTION = _CompactLogProb
    return _FUNCTION


def supported(model) -> bool:
    """Whether the compact head computes what trl's would: no logit scaling, softcapping or MoE loss."""
    config = model.config.get_text_config()
    plain = all(getattr(config, key, None) in (None, 1.0) for key in
                ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    head = model.get_output_embeddings()
    return (plain and not getattr(config, "output_router_logits", False) and head is not None
            and getattr(head, "bias", None) is None)


def use_compact_head(model) -> bool:
    """Route ``fused_lm_head=True`` calls of ``model`` (a PEFT model or a plain one) to ``compact_log_prob``.

    Call after trl's SFTTrainer was built (it patches the same method). Returns False, changing
    nothing, for a model whose head scales or caps its logits (trl's head handles those).
    """
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supported(base):
        return False
    original = type(base).forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(self, *args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        labels = labels.to(head.weight.device)
        mask = labels != -100
        log_prob, entropy, is_top1 = compact_log_prob(hidden.to(head.weight.device)[mask], head.weight, labels[mask])
        # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero)
        log_probs = log_prob.new_zeros(mask.shape).masked_scatter(mask, log_prob)
        entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        is_top1 = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device).masked_scatter(mask, is_top1)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   log_sum_sq_probs=None, mean_logits=None, is_top1=is_top1, label_mask=mask,
                                   aux_loss=None)

    base.forward = types.MethodType(forward, base)
    return True
