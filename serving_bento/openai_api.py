"""OpenAI-compatible endpoints: chat completions, completions and the model list.

Bodies follow the OpenAI API closely enough for the official ``openai`` client (tested in
``tests/serving_bento/test_openai_client.py``): ``stream: true`` answers server-sent events
``data: {chunk}`` ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk
with token counts. ``model`` must name the served model (``GET /v1/models``); any other name is a
404, as OpenAI answers for an unknown model. ``temperature: 0`` means greedy decoding.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving_bento.app import endpoint, get_backend
from serving_bento.backend import Completion
from serving_bento.engine import SamplingParams
from serving_bento.schemas import ChatCompletionRequest, CompletionRequest, RequestError, parse_body


def _check_model(backend: Any, name: str) -> None:
    served = backend.config.model_id()
    if name != served:
        raise RequestError(404, f"model: {name!r} is not served here; this service serves {served!r}",
                           param="model", code="model_not_found")


def _sampling(backend: Any, body: Any, ids: list[int], max_tokens: int | None, param: str) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=backend.clamp_new_tokens(ids, max_tokens, param),
        do_sample=body.temperature > 0,
        temperature=body.temperature or 1.0,
        top_p=body.top_p,
        seed=body.seed,
    )


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@endpoint("chat_completions")
async def chat_completions(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    body: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
    _check_model(backend, body.model)
    ids = backend.encode_messages(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = _sampling(backend, body, ids, max_tokens, "max_tokens")
    created, rid, model = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}", body.model
    if not body.stream:
        text, c = await backend.complete(ids, params, stop=body.stop, endpoint="chat_completions")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage(c),
        })
    completion = Completion(prompt_tokens=len(ids))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    async def events() -> AsyncIterator[str]:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        async for piece in backend.stream(ids, params, completion, stop=body.stop, endpoint="chat_completions"):
            yield _sse(chunk({"content": piece}, None))
        yield _sse(chunk({}, completion.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(completion)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@endpoint("completions")
async def completions(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    body: CompletionRequest = parse_body(raw, CompletionRequest)
    _check_model(backend, body.model)
    prompt = body.prompt_text()
    ids = backend.encode_prompt(prompt)
    params = _sampling(backend, body, ids, body.max_tokens, "max_tokens")
    created, rid, model = int(time.time()), f"cmpl-{uuid.uuid4().hex}", body.model
    prefix = prompt if body.echo else ""
    if not body.stream:
        text, c = await backend.complete(ids, params, stop=body.stop, endpoint="completions")
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": prefix + text, "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage(c),
        })
    completion = Completion(prompt_tokens=len(ids))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    async def events() -> AsyncIterator[str]:
        if prefix:
            yield _sse(chunk(prefix, None))
        async for piece in backend.stream(ids, params, completion, stop=body.stop, endpoint="completions"):
            yield _sse(chunk(piece, None))
        yield _sse(chunk("", completion.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(completion)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@endpoint("models", body=False)
async def list_models(request: Request, raw: bytes) -> Response:
    backend = get_backend()
    adapters = [{"name": a.name, "strength": a.strength} for a in backend.config.adapters]
    return JSONResponse({"object": "list", "data": [{
        "id": backend.config.model_id(), "object": "model", "created": 0, "owned_by": "kaiflow",
        "root": backend.config.model, "adapters": adapters,
    }]})
