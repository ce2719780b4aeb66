"""Prompt prefix caching for the batching engine: prefill only what a prompt does not share.

Chat prompts repeat themselves: the chat template's system prompt opens every request, and a
conversation's next turn repeats the whole conversation so far. For a causal decoder the keys and
values of a prompt's first *n* tokens depend on those *n* tokens alone (RoPE positions count from
the start), so a new prompt that begins with the same *n* tokens as an earlier one can take those
*n* columns of the earlier prompt's KV cache and prefill only the rest. vLLM calls this automatic
prefix caching; SGLang keeps the prompts in a radix tree.

:class:`PrefixCache` keeps the KV of recent prompts (least recently used first out, within a
budget of cached tokens), keyed by the adapter that computed them (per-request adapters change
the keys and values, so a prefix is only shared between requests for the same adapter). A lookup
returns the longest stored prefix of the prompt, at most all of it but its last token (the
prefill must compute at least one position to get the next token's logits).

Numerics: in fp32 the reused columns equal recomputed ones up to float rounding (the same
differences that batching prompts together already makes). With the dynamic int8 kernels the
activations of each forward pass are quantized with one scale for the whole pass, so a prompt's
keys and values depend on what was prefilled with it, with or without this cache; the quality
bound of int8 covers both (``tests/serving_bento/test_quantize.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# a prefix shorter than this is prefilled again: copying its columns saves little
MIN_PREFIX_TOKENS = 8

Layers = list[tuple[Any, Any]]  # per decoder layer: keys, values [1, kv_heads, tokens, head_dim]


def common_prefix_length(a: tuple[int, ...] | list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (slice comparisons run in C)."""
    low, high = 0, min(len(a), len(b), limit)
    if high and list(a[:high]) == b[:high]:
        return high
    while low < high:  # invariant: the first ``low`` tokens match, the first ``high`` do not all match
        mid = (low + high + 1) // 2
        if list(a[:mid]) == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


class PrefixCache:
    """The KV of recent prompts, per adapter, within ``max_tokens`` cached tokens (LRU)."""

    def __init__(self, max_tokens: int, min_tokens: int = MIN_PREFIX_TOKENS):
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], Layers] = OrderedDict()
        self.tokens = 0  # cached tokens now (the budget's unit)
        self.queried = 0  # prompt tokens looked up so far
        self.hits = 0  # of those, tokens found cached

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str | None, prompt: list[int]) -> tuple[int, Layers | None]:
        """The longest cached prefix of ``prompt`` (for ``adapter``): (its length, the entry's layers,
        whose first that-many columns are the prefix's keys and values); (0, None) when none is at
        least ``min_tokens`` long."""
        self.queried += len(prompt)
        best, best_key = 0, None
        limit = len(prompt) - 1
        for key in self._entries:
            if key[0] != adapter:
                continue
            n = common_prefix_length(key[1], prompt, limit)
            if n > best:
                best, best_key = n, key
        if best_key is None or best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += best
        return best, self._entries[best_key]

    def wants(self, adapter: str | None, prompt: list[int]) -> bool:
        """Whether :meth:`store` would keep ``prompt`` (so its keys and values are worth copying out)."""
        if self.max_tokens <= 0 or len(prompt) <= self.min_tokens or len(prompt) > self.max_tokens:
            return False
        tokens = tuple(prompt)
        return not any(key[0] == adapter and len(key[1]) >= len(tokens) and key[1][:len(tokens)] == tokens
                       for key in self._entries)

    def store(self, adapter: str | None, prompt: list[int], layers: Layers) -> bool:
        """Keep ``prompt``'s keys and values (``layers``, owned by the cache from now on); entries
        that are prefixes of it go (it holds them); the least recently used go while the budget is
        exceeded. False when not kept: see :meth:`wants`."""
        if not self.wants(adapter, prompt):
            return False
        tokens = tuple(prompt)
        for key in [k for k in self._entries if k[0] == adapter and len(k[1]) < len(tokens)
                    and tokens[:len(k[1])] == k[1]]:
            self._drop(key)
        self._entries[(adapter, tokens)] = layers
        self.tokens += len(tokens)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        del self._entries[key]
        self.tokens -= len(key[1])
