"""The generate loops behind the service: a step-level batching engine and a naive baseline.

Why our own loop
----------------
``model.generate`` runs one batch from start to end: a request that arrives while a batch is
decoding waits for the whole batch to finish, and every request in a batch must share its
sampling settings and length. BentoML's adaptive batching has the same shape (it batches
*calls*, not decode steps). On a small model most of a decode step's cost is fixed overhead
(reading the weights, Python, kernel launches), so a step over 8 sequences costs little more
than a step over one: throughput grows with the number of sequences decoded *together*.

:class:`BatchingEngine` therefore runs continuous (iteration-level) batching in one thread:

* every step, waiting requests are admitted (up to ``max_batch_size``): their prompts are
  prefilled together as one left-padded batch, and the new rows are spliced into the running
  batch's KV cache by left-padding the shorter of the two caches to a common length
  (the 2-D attention mask hides the pad columns; ``position_ids`` count only real tokens, so
  RoPE positions stay right for every row);
* one forward pass then decodes one token for every active row;
* each row samples with its own settings (greedy or temperature / top-k / top-p), and rows that
  finish (EOS, ``max_new_tokens``, the context limit, or a client that went away) leave the
  batch at once (``index_select`` on the cache), freeing their slot for the next request; cache
  columns that are padding in every remaining row are trimmed.

This works for decoder models whose cache is a plain ``DynamicCache`` (full attention: Llama,
Mistral, Qwen2, Phi-3 without sliding windows, ...). :class:`NaiveEngine` runs one
``model.generate`` at a time under a lock; it is the benchmark's baseline and the fallback for
other architectures (``KAIFLOW_ENGINE=naive``).

Both engines report to a callback per request: ``on_token(token_id)`` for each new token and
``on_finish(reason)`` once (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``); a request
whose ``SamplingParams.logprobs`` is set also gets ``on_logprobs(logprob, top)`` just before each
token (the model's log-probability of that token, from the raw logits as vLLM reports them, and
the ``logprobs`` most likely ``(token_id, logprob)``). The callbacks run on the engine thread and
must be cheap (the service hands them to its event loop).

Failures stay with the request that caused them: a request whose sampling settings cannot be
set up, whose row fails to sample, or whose callback raises ends alone with ``"error"``; a failed
prefill ends only the requests being admitted (the running batch's cache is untouched); only a
failed decode step, which cannot be pinned on one row, ends the rows of that batch. Every request
taken from the queue gets its ``on_finish`` exactly once, also when the engine stops.

Adapters per request: with a model whose LoRA layers follow an
:class:`~serving_bento.adapters.AdapterRouter`, each request names its adapter (``None``: the base
model) and before every forward pass the engine tells the router the adapter of each row, so
requests for different adapters decode in one batch.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from serving_bento.prefix_cache import PrefixCache

log = logging.getLogger("kaiflow.serving.engine")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; validated by the HTTP layer before it gets here."""

    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    do_sample: bool = field(default=False, metadata={"help": "sample; greedy (argmax) when false"})
    temperature: float = field(default=1.0, metadata={"help": "logit temperature when sampling (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 keeps all"})
    seed: int | None = field(default=None, metadata={"help": "seed for this request's sampling"})
    logprobs: int | None = field(default=None, metadata={
        "help": "report each token's log-probability and this many top alternatives (0: none); None: off"})



@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    adapter: str | None = None  # per-request adapter mode: the adapter's name, None for the base model
    on_logprobs: Callable[[float, list[tuple[int, float]]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    finished: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (client disconnected)."""
        self.cancelled.set()

    def emit(self, token: int, logprobs: Any = None) -> bool:
        """Hand a token (and its log-probabilities, a row of log_softmax) to the request; False (and
        the request cancelled) when a callback fails."""
        try:
            if logprobs is not None and self.on_logprobs is not None:
                k = self.params.logprobs or 0
                top = logprobs.topk(k) if k else None
                alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                self.on_logprobs(float(logprobs[token]), alternatives)
            self.on_token(token)
            return True
        except Exception:  # e.g. the handler's event loop is gone: only this request is affected
            log.exception("delivering a token failed; dropping that request")
            self.cancel()
            return False

    def finish(self, reason: str) -> None:
        """Report the end once, whatever happens in the callback."""
        if self.finished:
            return
        self.finished = True
        try:
            self.on_finish(reason)
        except Exception:
            log.exception("reporting the end of a request failed")


class EngineStopped(RuntimeError):
    pass


FAILED_ROW = -1  # what sample_next_tokens gives for a row it could not sample


def sample_next_tokens(logits: Any, params: Sequence[SamplingParams], generators: Sequence[Any]) -> Any:
    """Pick one token per row of ``logits`` [batch, vocab], each row with its own settings.

    A row whose sampling fails (e.g. non-finite probabilities) gets ``FAILED_ROW``; the others
    are unaffected.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.do_sample]
    if not sampled_rows:
        return greedy
    result = greedy.clone()
    for i in sampled_rows:
        try:
            result[i] = _sample_row(logits[i], params[i], generators[i])
        except Exception:
            log.exception("sampling failed for one row")
            result[i] = FAILED_ROW
    return result


def _sample_row(logits: Any, p: SamplingParams, generator: Any) -> Any:
    import torch

    row = logits.float() / max(p.temperature, 1e-5)
    if p.top_k and p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(row, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _logprob_rows(logits: Any, requests: Sequence[GenerationRequest]) -> list[Any]:
    """log_softmax of the rows that asked for log-probabilities (None for the others)."""
    import torch

    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    rows: list[Any] = [None] * len(requests)
    if wanted:
        lp = torch.log_softmax(logits[wanted].float(), dim=-1)
        for j, i in enumerate(wanted):
            rows[i] = lp[j]
    return rows


def _make_generator(params: SamplingParams) -> Any:
    import torch

    if not params.do_sample:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


class _Engine:
    """Shared plumbing: a request queue, a worker thread, stop tokens and the context limit."""

    name = "engine"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int, max_batch_size: int = 8,
                 router: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.router = router  # per-request adapters: which adapter each row of a forward pass uses
        self.adapters = frozenset(router.names if router is not None else ())
        self.stop_token_ids = _stop_token_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_token_ids)
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._stopping = threading.Event()
        self._admitting = threading.Event()  # cleared by hold(): nothing leaves the queue meanwhile
        self._admitting.set()
        # taken from the queue just as a hold began: admitted first once it ends (see _take_waiting)
        self._held: list[GenerationRequest] = []
        self._thread = threading.Thread(target=self._run_forever, name=f"kaiflow-{self.name}", daemon=True)
        self.active_requests = 0
        self.steps = 0
        self.step_observer: Callable[[int], None] | None = None  # rows per decode step, for metrics
        self.state_observer: Callable[[int, int], None] | None = None  # (running, waiting), for metrics

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        if not self.running:
            raise EngineStopped("the generation engine is not running")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise ValueError(f"adapter {request.adapter!r} is not loaded")
        self._queue.put(request)
        self._report_state()
        return request

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit no new request while inside; rows already decoding go on. What is submitted meanwhile
        waits in the queue and is admitted together (up to ``max_batch_size``) at the first step after:
        how a test puts known requests in one batch without depending on timing."""
        self._admitting.clear()
        try:
            yield
        finally:
            self._admitting.set()

    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def _report_state(self) -> None:
        if self.state_observer is not None:
            try:
                self.state_observer(self.active_requests, self._queue.qsize())
            except Exception:  # metrics must never stop generation
                log.exception("reporting the engine state failed")

    def _route(self, requests: Sequence[GenerationRequest]) -> None:
        if self.router is not None:
            self.router.select([r.adapter for r in requests])

    def _run_forever(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._loop_once()
                except Exception:  # a failed decode step: its batch ends, the server goes on
                    log.exception("generation step failed")
                    self._fail_active()
                self._report_state()
        self._fail_active("cancelled")
        for item in self._held:
            item.finish("cancelled")
        self._held = []
        while True:  # requests still queued when the engine stops get their answer too
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.finish("cancelled")
        self._report_state()

    def _loop_once(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fail_active(self, reason: str = "error") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish_reason(self, request: GenerationRequest, token: int, total_len: int) -> str | None:
        if token in self.stop_token_ids:
            return "stop"
        if request.generated >= request.params.max_new_tokens or total_len >= self.context_length:
            return "length"
        return None


def _stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list | tuple) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass
class _Row:
    request: GenerationRequest
    generator: Any
    last_token: int
    length: int  # real tokens in the cache + the pending last_token


class BatchingEngine(_Engine):
    """Continuous batching over a shared, left-padded KV cache (see the module docstring)."""

    name = "batching"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int, max_batch_size: int = 8,
                 router: Any = None, prefix_cache_tokens: int = 0):
        super().__init__(model, tokenizer, context_length=context_length, max_batch_size=max_batch_size,
                         router=router)
        self.device = next(model.parameters()).device
        # the KV of recent prompts, to prefill only what a new prompt adds to one of them; None: off
        self._prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.prefix_observer: Callable[[int, int], None] | None = None  # (prompt tokens, of them cached), for metrics
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # [rows, cache_len] 1 for real tokens, 0 for padding

    # -- admission ---------------------------------------------------------------------------
    def _take_waiting(self, block: bool) -> list[GenerationRequest]:
        if not self._admitting.is_set():
            if block:  # idle and held: wait for the release (or a stop) without spinning
                self._admitting.wait(0.05)
            return []
        room = self.max_batch_size - len(self._rows)
        taken, self._held = self._held[:room], self._held[room:]
        for item in [t for t in taken if t.cancelled.is_set()]:
            item.finish("cancelled")
            taken.remove(item)
        while len(taken) < room:
            try:
                item = self._queue.get(block=block and not taken, timeout=0.5 if block and not taken else None)
            except queue.Empty:
                break
            if item is None:  # stop sentinel
                break
            if item.cancelled.is_set():
                item.finish("cancelled")
                continue
            taken.append(item)
        if taken and not self._admitting.is_set():
            # a hold began while this thread waited in the queue (so what it took was submitted
            # after the hold began, or just before): they wait with what the hold queues
            self._held = taken + self._held
            return []
        return taken

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[Any, Any, Any]:
        """One forward pass over the new prompts, left-padded; a prompt that begins with a cached
        prefix (:mod:`serving_bento.prefix_cache`) starts from its keys and values, right-aligned
        in the pass's past columns, and only the rest of it is computed. Returns the last
        position's logits, the new rows' cache and their attention mask (padding: 0, also between
        a row's cached prefix and the rest of its prompt when the rests differ in length)."""
        import torch
        from transformers import DynamicCache

        hits = [self._prefixes.lookup(r.adapter, r.prompt_ids) if self._prefixes is not None else (0, None)
                for r in requests]
        past = max(n for n, _ in hits)
        if self._prefixes is not None and self.prefix_observer is not None:
            try:
                self.prefix_observer(sum(len(r.prompt_ids) for r in requests), sum(n for n, _ in hits))
            except Exception:  # metrics must never stop generation
                log.exception("reporting the prefix cache failed")
        rests = [len(r.prompt_ids) - n for r, (n, _) in zip(requests, hits, strict=True)]
        longest = max(rests)
        ids = torch.full((len(requests), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(requests), past + longest), dtype=torch.long)
        positions = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, (r, (n, _), rest) in enumerate(zip(requests, hits, rests, strict=True)):
            ids[i, longest - rest :] = torch.tensor(r.prompt_ids[n:])
            mask[i, past - n : past] = 1
            mask[i, past + longest - rest :] = 1
            positions[i, longest - rest :] = torch.arange(n, n + rest)
        cache = DynamicCache(config=self.model.config)
        if past:
            self._fill_past(cache, hits, past)
        self._route(requests)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        if self._prefixes is not None:
            self._remember(requests, hits, rests, cache, past, longest)
        return out.logits[:, -1, :], cache, mask.to(self.device)

    def _fill_past(self, cache: Any, hits: list[tuple[int, Any]], past: int) -> None:
        """Each row's cached prefix, right-aligned in ``past`` columns of zeros (masked for the rest)."""
        donor = next(layers for n, layers in hits if n)
        for index, layer in enumerate(cache.layers):
            k0, v0 = donor[index]
            keys = k0.new_zeros((len(hits), k0.shape[1], past, k0.shape[3]))
            values = v0.new_zeros((len(hits), v0.shape[1], past, v0.shape[3]))
            for row, (n, layers) in enumerate(hits):
                if n:
                    keys[row, :, past - n :] = layers[index][0][0, :, :n]
                    values[row, :, past - n :] = layers[index][1][0, :, :n]
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values

    def _remember(self, requests: list[GenerationRequest], hits: list[tuple[int, Any]], rests: list[int],
                  cache: Any, past: int, longest: int) -> None:
        """Offer each prompt's keys and values (its cached prefix and what this pass computed, as
        contiguous copies) to the prefix cache."""
        import torch

        for row, (r, (n, _), rest) in enumerate(zip(requests, hits, rests, strict=True)):
            if not self._prefixes.wants(r.adapter, r.prompt_ids):
                continue
            layers = []
            for layer in cache.layers:
                pair = []
                for t in (layer.keys, layer.values):
                    piece = t[row : row + 1, :, past + longest - rest :]
                    if n:
                        piece = torch.cat([t[row : row + 1, :, past - n : past], piece], dim=2)
                    pair.append(piece.clone() if not n else piece)
                layers.append((pair[0], pair[1]))
            self._prefixes.store(r.adapter, r.prompt_ids, layers)

    def _splice(self, cache: Any, mask: Any) -> None:
        """Append new rows (their cache and mask) to the running batch, left-padding the shorter."""
        import torch

        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        target = max(old_len, new_len)

        def pad_left(t: Any, length: int, dim: int) -> Any:
            missing = target - length
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([pad_left(old_layer.keys, old_len, 2), pad_left(new_layer.keys, new_len, 2)])
            old_layer.values = torch.cat(
                [pad_left(old_layer.values, old_len, 2), pad_left(new_layer.values, new_len, 2)]
            )
        self._mask = torch.cat([pad_left(self._mask, old_len, 1), pad_left(mask, new_len, 1)])

    def _admit(self, requests: list[GenerationRequest]) -> None:
        ready: list[GenerationRequest] = []
        generators: list[Any] = []
        for request in requests:
            try:
                generators.append(_make_generator(request.params))
            except Exception as exc:  # e.g. a seed torch refuses: this request alone fails
                log.warning("request refused at admission: %s", exc)
                request.finish("error")
                continue
            ready.append(request)
        if not ready:
            return
        try:
            logits, cache, mask = self._prefill(ready)
            params = [r.params for r in ready]
            tokens = sample_next_tokens(logits, params, generators).tolist()
            logprob_rows = _logprob_rows(logits, ready)
        except Exception:  # the running batch's cache is untouched: only these requests fail
            log.exception("prefill failed for %d new requests", len(ready))
            for request in ready:
                request.finish("error")
            return
        keep = []
        for i, (request, token) in enumerate(zip(ready, tokens, strict=True)):
            if token == FAILED_ROW:
                request.finish("error")
                continue
            request.generated = 1
            if not request.emit(token, logprob_rows[i]):
                request.finish("cancelled")
                continue
            reason = self._finish_reason(request, token, len(request.prompt_ids) + 1)
            if reason:
                request.finish(reason)
                continue
            keep.append(i)
            self._rows.append(_Row(request, generators[i], token, len(request.prompt_ids) + 1))
        if not keep:
            return
        if len(keep) < len(ready):
            cache.batch_select_indices(_index(keep, self.device))
            mask = mask[keep]
        self._splice(cache, mask)

    # -- decoding ----------------------------------------------------------------------------
    def _decode_step(self) -> None:
        import torch

        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        ids = torch.tensor([[row.last_token] for row in self._rows], device=self.device)
        positions = torch.tensor([[row.length - 1] for row in self._rows], device=self.device)
        self._route([row.request for row in self._rows])
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        params = [row.request.params for row in self._rows]
        logits = out.logits[:, -1, :]
        tokens = sample_next_tokens(logits, params, [r.generator for r in self._rows]).tolist()
        logprob_rows = _logprob_rows(logits, [row.request for row in self._rows])
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            if row.request.cancelled.is_set():
                row.request.finish("cancelled")
                continue
            if token == FAILED_ROW:
                row.request.finish("error")
                continue
            row.request.generated += 1
            row.length += 1
            row.last_token = token
            if not row.request.emit(token, logprob_rows[i]):
                row.request.finish("cancelled")
                continue
            reason = self._finish_reason(row.request, token, row.length)
            if reason:
                row.request.finish(reason)
            else:
                keep.append(i)
        self.steps += 1
        if self.step_observer is not None:
            self.step_observer(len(self._rows))
        if len(keep) < len(self._rows):
            self._drop_rows(keep)

    def _drop_rows(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
            return
        self._cache.batch_select_indices(_index(keep, self.device))
        self._mask = self._mask[keep]
        # columns that are padding in every remaining row cost compute in every later step
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]
            self._mask = self._mask[:, first:]

    def _loop_once(self) -> None:
        waiting = self._take_waiting(block=not self._rows)
        if waiting:
            self._admit(waiting)
        self.active_requests = len(self._rows)
        self._report_state()
        if self._rows:
            self._decode_step()
        self.active_requests = len(self._rows)

    def _fail_active(self, reason: str = "error") -> None:
        for row in self._rows:
            row.request.finish(reason)
        self._rows, self._cache, self._mask = [], None, None
        self.active_requests = 0


def _index(rows: list[int], device: Any) -> Any:
    import torch

    return torch.tensor(rows, dtype=torch.long, device=device)


class NaiveEngine(_Engine):
    """One ``model.generate`` at a time, in arrival order: the baseline the batching engine beats."""

    name = "naive"

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int, max_batch_size: int = 1,
                 router: Any = None):
        super().__init__(model, tokenizer, context_length=context_length, max_batch_size=1, router=router)
        self._current: GenerationRequest | None = None

    def _loop_once(self) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if not self._admitting.wait(0.05):
            return
        try:
            request = self._queue.get(timeout=0.5)
        except queue.Empty:
            return
        if request is None:
            return
        if request.cancelled.is_set():
            request.finish("cancelled")
            return
        self._current = request
        self.active_requests = 1
        self._report_state()
        engine = self
        state = {"reason": None}

        class _Forward(StoppingCriteria):
            """Streams each new token to the request and decides when to stop."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                token = int(input_ids[0, -1])
                request.generated += 1
                # generate hands over the processed scores (after temperature/top-k/top-p)
                logprobs = torch.log_softmax(scores[0].float(), dim=-1) if p.logprobs is not None else None
                delivered = request.emit(token, logprobs)
                reason = "cancelled" if request.cancelled.is_set() or not delivered else None
                reason = reason or engine._finish_reason(request, token, input_ids.shape[1])
                state["reason"] = reason
                return torch.tensor([reason is not None])

        p = request.params
        kwargs: dict[str, Any] = {"do_sample": p.do_sample}
        self._route([request])
        if p.do_sample:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None)
        device = next(self.model.parameters()).device
        # generate() samples from torch's global generator: give this request its own state (its
        # seed, or fresh entropy) and put the global one back after, so a seeded request never
        # makes the next unseeded one predictable.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if p.seed is not None:
                torch.manual_seed(p.seed)
            else:
                torch.seed()
            self.model.generate(
                input_ids=torch.tensor([request.prompt_ids], device=device),
                attention_mask=torch.ones((1, len(request.prompt_ids)), dtype=torch.long),
                max_new_tokens=p.max_new_tokens,
                stopping_criteria=StoppingCriteriaList([_Forward()]),
                pad_token_id=self.pad_token_id,
                **kwargs,
            )
        request.finish(state["reason"] or "length")
        self._current = None
        self.active_requests = 0

    def _fail_active(self, reason: str = "error") -> None:
        if self._current is not None:
            self._current.finish(reason)
        self._current = None
        self.active_requests = 0


ENGINES: dict[str, type[_Engine]] = {"batching": BatchingEngine, "naive": NaiveEngine}


def make_engine(kind: str, model: Any, tokenizer: Any, *, context_length: int, max_batch_size: int,
                router: Any = None, prefix_cache_tokens: int = 0) -> _Engine:
    """An engine by name; ``prefix_cache_tokens`` sizes the batching engine's prefix cache (the
    naive engine, ``model.generate`` as it comes, has none)."""
    if kind == "batching":
        return BatchingEngine(model, tokenizer, context_length=context_length, max_batch_size=max_batch_size,
                              router=router, prefix_cache_tokens=prefix_cache_tokens)
    try:
        engine_cls = ENGINES[kind]
    except KeyError:
        raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}") from None
    return engine_cls(model, tokenizer, context_length=context_length, max_batch_size=max_batch_size,
                      router=router)
