"""OpenAI-compatible endpoints: chat completions, completions and the model list.

Bodies follow the OpenAI API closely enough for the official ``openai`` client (tested in
``tests/serving_bento/test_openai_client.py``): ``stream: true`` answers server-sent events
``data: {chunk}`` ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk
with token counts. ``model`` names the base model or, with ``KAIFLOW_ADAPTER_MODE=per-request``, one
of its adapters (``GET /v1/models`` lists them, adapters with ``parent`` = the base, as vLLM does);
any other name is a 404, as OpenAI answers for an unknown model. ``temperature: 0`` means greedy
decoding. Parsing and tokenizing run in a worker thread (see :mod:`serving_bento.app`); a failure
after a stream has started ends it with an ``{"error": ...}`` event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving_bento.app import endpoint, get_backend, unless_disconnected
from serving_bento.backend import Completion
from serving_bento.engine import SamplingParams
from serving_bento.schemas import ChatCompletionRequest, CompletionRequest, RequestError, parse_body


def _prepare_chat(backend: Any, raw: bytes) -> tuple[ChatCompletionRequest, list[int], str | None]:
    body: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
    adapter = backend.adapter_for(body.model)
    return body, backend.encode_messages(body.messages), adapter


def _prepare_completion(backend: Any, raw: bytes) -> tuple[CompletionRequest, list[int], str | None]:
    body: CompletionRequest = parse_body(raw, CompletionRequest)
    adapter = backend.adapter_for(body.model)
    return body, backend.encode_prompt(body.prompt_text()), adapter


async def _guarded(pieces: AsyncIterator[str], on_error: list[RequestError]) -> AsyncIterator[str]:
    """Pass pieces through; a failure once the stream has started is recorded, not raised."""
    try:
        async for piece in pieces:
            yield piece
    except RequestError as exc:
        on_error.append(exc)


def _sampling(backend: Any, body: Any, ids: list[int], max_tokens: int | None, param: str) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=backend.clamp_new_tokens(ids, max_tokens, param),
        do_sample=body.temperature > 0,
        temperature=body.temperature or 1.0,
        top_p=body.top_p,
        seed=body.seed,
        logprobs=body.logprobs_wanted(),
    )


def _chat_logprobs(backend: Any, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any]:
    """OpenAI chat ``logprobs``: one entry per token with its top alternatives."""

    def item(token: int, logprob: float) -> dict[str, Any]:
        text = backend.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(token, lp), "top_logprobs": [item(t, l) for t, l in top]}
                        for token, lp, top in entries], "refusal": None}


def _completion_logprobs(backend: Any, entries: list[tuple[int, float, list[tuple[int, float]]]],
                         offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs``: parallel lists, top alternatives as {token: logprob}."""
    tokens = [backend.token_text(token) for token, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{backend.token_text(t): l for t, l in top} for _, _, top in entries],
            "text_offset": offsets}


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@endpoint("chat_completions")
async def chat_completions(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    body, ids, adapter = await run_in_threadpool(_prepare_chat, backend, raw)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling(backend, body, ids, max_tokens, "max_tokens")
    created, rid, model = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}", body.model
    if not body.stream:
        text, c = await unless_disconnected(request, backend.complete(
            ids, params, stop=body.stop, endpoint="chat_completions", adapter=adapter))
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": c.finish_reason,
                         "logprobs": _chat_logprobs(backend, c.logprobs) if body.logprobs else None}],
            "usage": _usage(c),
        })
    completion = Completion(prompt_tokens=len(ids))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    sent_logprobs = 0

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        nonlocal sent_logprobs
        logprobs = None
        if body.logprobs:  # the tokens that arrived since the last chunk
            logprobs = _chat_logprobs(backend, completion.logprobs[sent_logprobs:])
            sent_logprobs = len(completion.logprobs)
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    async def events() -> AsyncIterator[str]:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        failed: list[RequestError] = []
        async for piece in _guarded(backend.stream(ids, params, completion, stop=body.stop,
                                                   endpoint="chat_completions", adapter=adapter), failed):
            yield _sse(chunk({"content": piece}, None))
        if failed:
            yield _sse(failed[0].body())
            yield _sse("[DONE]")
            return
        yield _sse(chunk({}, completion.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(completion)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@endpoint("completions")
async def completions(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    body, ids, adapter = await run_in_threadpool(_prepare_completion, backend, raw)
    prompt = body.prompt_text()
    params = _sampling(backend, body, ids, body.max_tokens, "max_tokens")
    created, rid, model = int(time.time()), f"cmpl-{uuid.uuid4().hex}", body.model
    prefix = prompt if body.echo else ""
    if not body.stream:
        text, c = await unless_disconnected(request, backend.complete(
            ids, params, stop=body.stop, endpoint="completions", adapter=adapter))
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": prefix + text, "finish_reason": c.finish_reason,
                         "logprobs": None if body.logprobs is None else
                         _completion_logprobs(backend, c.logprobs, len(prefix))}],
            "usage": _usage(c),
        })
    completion = Completion(prompt_tokens=len(ids))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    sent = {"logprobs": 0, "offset": len(prefix)}

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None:  # the tokens that arrived since the last chunk
            logprobs = _completion_logprobs(backend, completion.logprobs[sent["logprobs"]:], sent["offset"])
            sent["logprobs"] = len(completion.logprobs)
            sent["offset"] += sum(len(t) for t in logprobs["tokens"])
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    async def events() -> AsyncIterator[str]:
        if prefix:
            yield _sse(chunk(prefix, None))
        failed: list[RequestError] = []
        async for piece in _guarded(backend.stream(ids, params, completion, stop=body.stop,
                                                   endpoint="completions", adapter=adapter), failed):
            yield _sse(chunk(piece, None))
        if failed:
            yield _sse(failed[0].body())
            yield _sse("[DONE]")
            return
        yield _sse(chunk("", completion.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(completion)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@endpoint("models", body=False)
async def list_models(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    config = backend.config
    base = config.model_id()
    strengths = {a.name: a.strength for a in config.adapters}
    entry = {"id": base, "object": "model", "created": 0, "owned_by": "kaiflow", "root": config.model,
             "parent": None, "max_model_len": backend.loaded.context_length}
    if config.adapter_mode == "merged":  # the adapters are folded into the one model
        entry["adapters"] = [{"name": name, "strength": strength} for name, strength in strengths.items()]
    data = [entry]
    for model_id, adapter in backend.served_models()[1:]:
        data.append({"id": model_id, "object": "model", "created": 0, "owned_by": "kaiflow",
                     "root": adapter, "parent": base, "strength": strengths[adapter],
                     "max_model_len": backend.loaded.context_length})
    return JSONResponse({"object": "list", "data": data})
