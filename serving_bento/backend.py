"""The bridge between the HTTP handlers (asyncio) and the generation engine (a thread).

:class:`ChatBackend` loads the model in a background thread (so ``/livez`` answers while a big
model loads and ``/readyz`` turns ready only once the model and its adapters are in memory),
turns prompts and chat messages into token ids under the configured limits, and exposes
:meth:`ChatBackend.stream`: an async iterator of text pieces for one request.

Prompt work (templating, tokenizing) is synchronous and can take long for a big prompt, so the
handlers run it in a worker thread (:func:`starlette.concurrency.run_in_threadpool`), never on
the event loop that also answers ``/readyz``; a prompt over the character limit is refused
before any of that work. Token ids come
from the engine thread through ``loop.call_soon_threadsafe`` into a per-request asyncio queue;
text is decoded incrementally (the full decode of the generated ids, minus what was already sent,
holding back a trailing partial UTF-8 character and anything that may be the start of a stop
string).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serving_bento.adapters import load_model
from serving_bento.config import ServiceConfig
from serving_bento.engine import EngineStopped, GenerationRequest, SamplingParams, make_engine
from serving_bento.schemas import Message, RequestError

log = logging.getLogger("kaiflow.serving")


@dataclass
class Completion:
    """What a finished request reports besides its text."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    # (token id, its logprob, [(alternative id, logprob)]) per generated token, when asked for
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


# Template markup per chat message counted against the character cap before rendering (roles,
# separators: ChatML spends about 15 characters per turn).
MESSAGE_OVERHEAD_CHARS = 16


class Metrics:
    """Token counters and latency histograms, on BentoML's /metrics (prometheus_client).

    Each figure is kept twice: under kaiflow's names (per endpoint) and under vLLM's names with a
    ``model_name`` label, which Kaito's dashboards and KEDA autoscaling read
    (``vllm:num_requests_waiting``).
    """

    def __init__(self, registry: Any = None, model_name: str = "") -> None:
        # imported here, after BentoML set PROMETHEUS_MULTIPROC_DIR in the worker
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = {"registry": registry or REGISTRY}
        self.model_name = model_name
        # one worker holds the model: the live worker's value is the value
        self.vllm_running = Gauge("vllm:num_requests_running", "requests in the decoding batch", ["model_name"],
                                  multiprocess_mode="livesum", **reg)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "requests queued for a batch slot", ["model_name"],
                                  multiprocess_mode="livesum", **reg)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "prefill tokens processed", ["model_name"], **reg)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "tokens generated", ["model_name"], **reg)
        self.vllm_prefix_queries = Counter("vllm:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                           ["model_name"], **reg)
        self.vllm_prefix_hits = Counter("vllm:prefix_cache_hits", "prompt tokens found in the prefix cache",
                                        ["model_name"], **reg)
        self.vllm_success = Counter("vllm:request_success", "finished requests by finish reason",
                                    ["model_name", "finished_reason"], **reg)
        vllm_buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "time to first token", ["model_name"],
                                   buckets=vllm_buckets, **reg)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "time from request to its last token",
                                  ["model_name"], buckets=vllm_buckets, **reg)
        self.vllm_running.labels(model_name).set(0)
        self.vllm_waiting.labels(model_name).set(0)
        self.requests = Counter("kaiflow_requests", "chat requests by endpoint and outcome", ["endpoint", "outcome"],
                                **reg)
        self.prompt_tokens = Counter("kaiflow_prompt_tokens", "prompt tokens processed", ["endpoint"], **reg)
        self.generated_tokens = Counter("kaiflow_generated_tokens", "tokens generated", ["endpoint"], **reg)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.latency = Histogram(
            "kaiflow_request_duration_seconds", "time from request to last token", ["endpoint"], buckets=buckets, **reg
        )
        self.batch_rows = Histogram(
            "kaiflow_batch_rows", "sequences decoded together per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            **reg,
        )
        self.first_token = Histogram(
            "kaiflow_time_to_first_token_seconds", "time from request to first token", ["endpoint"], buckets=buckets,
            **reg,
        )

    def prefix_cache(self, queried: int, hits: int) -> None:
        self.vllm_prefix_queries.labels(self.model_name).inc(queried)
        self.vllm_prefix_hits.labels(self.model_name).inc(hits)

    def engine_state(self, running: int, waiting: int) -> None:
        self.vllm_running.labels(self.model_name).set(running)
        self.vllm_waiting.labels(self.model_name).set(waiting)


class ChatBackend:
    def __init__(self, config: ServiceConfig, metrics_registry: Any = None):
        self.config = config
        self._metrics_registry = metrics_registry  # None: prometheus_client's default (BentoML's /metrics)
        self.loaded: Any = None
        self.engine: Any = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self.metrics: Metrics | None = None
        # HF fast tokenizers are not safe to use from several threads at once ("Already borrowed")
        self._encode_lock = threading.Lock()
        self._special_tokens: tuple[str, ...] | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="kaiflow-model-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self.metrics = Metrics(self._metrics_registry, self.config.model_id())
            self.loaded = load_model(self.config)
            self.engine = make_engine(
                self.config.engine,
                self.loaded.model,
                self.loaded.tokenizer,
                context_length=self.loaded.context_length,
                max_batch_size=self.config.max_batch_size,
                router=self.loaded.router,
                prefix_cache_tokens=self.config.prefix_cache_tokens,
            )
            self.engine.step_observer = self.metrics.batch_rows.observe
            self.engine.state_observer = self.metrics.engine_state
            if hasattr(self.engine, "prefix_observer"):
                self.engine.prefix_observer = self.metrics.prefix_cache
            self.engine.start()
        except Exception as exc:  # reported through /livez and the log; the pod restarts
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.load_error)
            return
        log.info(
            "model %s ready in %.1f s (engine %s, adapters %s, %s)",
            self.config.model, time.monotonic() - started, self.config.engine,
            [(a.name, a.strength) for a in self.config.adapters], self.config.adapter_mode,
        )
        self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.engine.running

    @property
    def alive(self) -> bool:
        return self.load_error is None and (not self._ready.is_set() or self.engine.running)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- prompts -------------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, self.load_error or "the model is still loading; retry when /readyz is ready")

    # -- models and adapters ------------------------------------------------------------------
    def served_models(self) -> list[tuple[str, str | None]]:
        """(model id, adapter or None for the base) for every model a request may name."""
        base = self.config.model_id()
        return [(base, None)] + [(name, name) for name in (self.loaded.per_request_adapters if self.loaded else ())]

    def adapter_for(self, name: str | None, param: str = "model") -> str | None:
        """The adapter a request's model (or /chat's adapter) selects; None: the base model."""
        if name is None:
            return None
        served = dict(self.served_models())
        if name in served:
            return served[name]
        ids = ", ".join(repr(n) for n in served)
        hint = ""
        if self.config.adapters and self.config.adapter_mode == "merged":
            hint = " (adapters are merged into the base model; KAIFLOW_ADAPTER_MODE=per-request serves them by name)"
        raise RequestError(404, f"{param}: {name!r} is not served here; this service serves {ids}{hint}",
                           param=param, code="model_not_found")

    # -- prompts (synchronous: the handlers run these in a worker thread) ----------------------
    def _check_chars(self, chars: int, param: str) -> None:
        limit = self.config.prompt_char_limit
        if chars > limit:
            raise RequestError(
                400, f"{param}: the prompt has {chars} characters; the limit is {limit} (checked before "
                "tokenizing; KAIFLOW_MAX_PROMPT_CHARS)", param=param, code="context_length_exceeded",
            )

    def encode_messages(self, messages: list[Message], param: str = "messages") -> list[int]:
        if not messages:
            raise RequestError(400, f"{param}: must hold at least one message", param=param)
        if self.loaded.chat_template == "none":
            raise RequestError(400, f"{param}: this base model has no chat template; send a prompt instead", param=param)
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        # Each message costs its template markup too: tens of thousands of empty messages fit the
        # body limit yet render far past the character cap, so they are counted before rendering,
        # and the rendered text is measured again before it is tokenized.
        self._check_chars(sum(len(m["content"]) + MESSAGE_OVERHEAD_CHARS for m in conversation), param)
        self._refuse_special_tokens(conversation, param)
        with self._encode_lock:
            try:
                text = self.loaded.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                                 tokenize=False)
            except Exception as exc:  # templates raise on roles/orders they do not support
                raise RequestError(400, f"{param}: the model's chat template refused these messages: {exc}",
                                   param=param) from None
            self._check_chars(len(text), param)
            ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._check_prompt(ids, param)

    def special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special tokens as text (``<|im_start|>``, ``<|user|>``, ``</s>`` ...)."""
        if self._special_tokens is None:
            tokenizer = self.loaded.tokenizer
            found = set(getattr(tokenizer, "all_special_tokens", None) or [])
            for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
                if getattr(token, "special", False):
                    found.add(str(token.content))
            self._special_tokens = tuple(sorted((t for t in found if t), key=len, reverse=True))
        return self._special_tokens

    def _refuse_special_tokens(self, conversation: list[dict[str, str]], param: str) -> None:
        """Message text is tokenized after the template renders it, so a special token written in
        a message would become a real role boundary (a forged system turn): refused, naming it."""
        specials = self.special_tokens()
        for i, message in enumerate(conversation):
            for token in specials:
                if token in message["content"]:
                    raise RequestError(400, f"{param}[{i}].content: contains the model's special token {token!r}, "
                                       "which would act as chat markup; remove it", param=f"{param}[{i}].content")

    def encode_prompt(self, prompt: str, param: str = "prompt") -> list[int]:
        self._check_chars(len(prompt), param)
        with self._encode_lock:
            ids = self.loaded.tokenizer(prompt)["input_ids"]
        return self._check_prompt(ids, param)

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise RequestError(400, f"{param}: the prompt is empty", param=param)
        limit = min(self.config.max_prompt_tokens, self.loaded.context_length - 1)
        if len(ids) > limit:
            raise RequestError(
                400, f"{param}: the prompt has {len(ids)} tokens; the limit is {limit}",
                param=param, code="context_length_exceeded",
            )
        return ids

    def clamp_new_tokens(self, prompt_ids: list[int], requested: int | None, param: str,
                         default: int | None = None) -> int:
        """Tokens to generate: what was asked (refused over the limit), else ``default`` capped."""
        limit = self.config.max_new_tokens
        if requested is not None and requested > limit:
            raise RequestError(400, f"{param}: {requested} is more than this service allows ({limit})", param=param)
        room = self.loaded.context_length - len(prompt_ids)
        return max(1, min(requested or default or limit, limit, room))

    def decode(self, ids: list[int]) -> str:
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (what a logprobs entry names)."""
        return self.loaded.tokenizer.decode([token])

    # -- generation ----------------------------------------------------------------------------
    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, completion: Completion,
        *, stop: list[str] | None = None, endpoint: str = "chat", adapter: str | None = None,
    ) -> AsyncIterator[str]:
        """Yield the generated text piece by piece; fills ``completion`` as it goes."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("token", token))

        def on_finish(reason: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("finish", reason))

        def on_logprobs(logprob: float, top: list[tuple[int, float]]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("logprobs", (logprob, top)))

        try:
            request = self.engine.submit(GenerationRequest(
                prompt_ids, params, on_token, on_finish, adapter=adapter,
                on_logprobs=on_logprobs if params.logprobs is not None else None))
        except EngineStopped:  # shutting down (or the loop died: /livez says so)
            raise RequestError(503, "the generation engine is not running; retry") from None
        pending_logprobs: tuple[float, list[tuple[int, float]]] | None = None
        metrics = self.metrics
        model_name = metrics.model_name
        metrics.prompt_tokens.labels(endpoint).inc(len(prompt_ids))
        metrics.vllm_prompt_tokens.labels(model_name).inc(len(prompt_ids))
        generated: list[int] = []
        sent = ""
        hold = max((len(s) for s in stop), default=1) - 1 if stop else 0
        try:
            while True:
                kind, value = await events.get()
                if kind == "logprobs":  # always just before its token
                    pending_logprobs = value
                    continue
                if kind == "finish":
                    completion.finish_reason = "length" if value == "length" else "stop"
                    if value != "cancelled":
                        metrics.vllm_success.labels(model_name, value).inc()
                    if value == "error":  # the engine logged why; the other requests go on
                        raise RequestError(500, "generation failed for this request; see the server log")
                    if value == "cancelled":
                        raise RequestError(503, "the generation engine stopped; retry")
                    text = self.decode(generated)
                    if text.startswith(sent) and len(text) > len(sent):
                        yield text[len(sent):]
                    return
                if completion.first_token_at is None:
                    completion.first_token_at = time.monotonic()
                    ttft = completion.first_token_at - completion.started_at
                    metrics.first_token.labels(endpoint).observe(ttft)
                    metrics.vllm_ttft.labels(model_name).observe(ttft)
                generated.append(value)
                completion.completion_tokens = len(generated)
                if pending_logprobs is not None:
                    completion.logprobs.append((value, *pending_logprobs))
                    pending_logprobs = None
                metrics.generated_tokens.labels(endpoint).inc()
                metrics.vllm_generation_tokens.labels(model_name).inc()
                text = self.decode(generated)
                if stop:
                    cut = min((text.find(s) for s in stop if s in text), default=-1)
                    if cut >= 0:
                        request.cancel()
                        completion.finish_reason = "stop"
                        if cut > len(sent):
                            yield text[len(sent):cut]
                        return
                if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                    continue
                upto = len(text) - hold
                if upto > len(sent) and text.startswith(sent):
                    yield text[len(sent):upto]
                    sent = text[:upto]
        finally:
            request.cancel()  # no-op when finished; frees the slot when the client went away
            elapsed = time.monotonic() - completion.started_at
            metrics.latency.labels(endpoint).observe(elapsed)
            metrics.vllm_e2e.labels(model_name).observe(elapsed)

    async def complete(
        self, prompt_ids: list[int], params: SamplingParams, *, stop: list[str] | None = None, endpoint: str = "chat",
        adapter: str | None = None,
    ) -> tuple[str, Completion]:
        completion = Completion(prompt_tokens=len(prompt_ids))
        pieces = [piece async for piece in self.stream(prompt_ids, params, completion, stop=stop, endpoint=endpoint,
                                                       adapter=adapter)]
        return "".join(pieces), completion
