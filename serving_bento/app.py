"""The HTTP face of the service: a Starlette app that BentoML mounts at ``/``.

BentoML serves its own ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics`` (never behind the
API key, so probes and Prometheus keep working); this app adds Kaito's ``GET /health``, the Kaito
endpoint ``POST /chat`` and the OpenAI endpoints (:mod:`serving_bento.openai_api`). Each handler
reads the body under the size limit, checks the optional bearer key, then validates and tokenizes
in a worker thread (:mod:`serving_bento.schemas`; the event loop stays free for probes and
streams) and answers every problem with a 4xx JSON error
``{"error": {"message", "type", "param", "code"}}``. A non-streamed request whose client hangs up
is cancelled (its batch slot freed) instead of generating for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving_bento.engine import SamplingParams
from serving_bento.schemas import KaitoChatRequest, RequestError, parse_body

log = logging.getLogger("kaiflow.serving")

Handler = Callable[[Request, Any], Awaitable[Response]]
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready."""

KAITO_DEFAULT_NEW_TOKENS = 200

_backend: Any = None  # the ChatBackend of this worker, set by the Bento service


def set_backend(backend: Any) -> None:
    global _backend
    _backend = backend


def get_backend() -> Any:
    if _backend is None:
        raise RequestError(503, "the service is starting")
    return _backend


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise RequestError(413, f"the body is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no Content-Length to trust
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_api_key(request: Request, api_key: str) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")


def endpoint(name: str, *, body: bool = True) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a handler with the shared policy: key, readiness, body limit, errors → JSON."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            outcome = "ok"
            backend = None
            try:
                backend = get_backend()
                check_api_key(request, backend.config.api_key)
                raw = await read_body(request, backend.config.max_body_bytes) if body else b""
                backend.require_ready()
                return await handler(request, raw)
            except RequestError as exc:
                outcome = str(exc.status)
                return JSONResponse(exc.body(), status_code=exc.status)
            except ClientDisconnected:
                outcome = "disconnected"
                return Response(status_code=499)  # nobody reads it; nginx's code for "client closed"
            except Exception:
                outcome = "500"
                log.exception("%s failed", name)
                return JSONResponse(
                    {"error": {"message": "internal error; see the server log", "type": "server_error",
                               "param": None, "code": None}},
                    status_code=500,
                )
            finally:
                if backend is not None and backend.metrics is not None:
                    backend.metrics.requests.labels(name, outcome).inc()

        return run

    return wrap


async def _wait_for_disconnect(request: Request) -> None:
    # the body was read already, so the next ASGI message is the client leaving (or never comes)
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (freeing its batch slot) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (shutdown): take the work along
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


def _prepare_kaito(backend: Any, raw: bytes) -> tuple[KaitoChatRequest, list[int], str | None]:
    """Parse and tokenize (in a worker thread: big prompts must not stall the event loop)."""
    body: KaitoChatRequest = parse_body(raw, KaitoChatRequest)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError(400, "send exactly one of prompt or messages", param="prompt")
    adapter = backend.adapter_for(body.adapter, "adapter")
    if body.messages is not None:
        ids = backend.encode_messages(body.messages)
    else:
        ids = backend.encode_prompt(body.prompt)
    return body, ids, adapter


@endpoint("chat")
async def kaito_chat(request: Request, raw: bytes) -> Response:
    """Kaito's ``/chat``: ``{"prompt"}`` or ``{"messages"}`` + ``generate_kwargs`` → ``{"Result"}``."""
    backend = get_backend()
    body, ids, adapter = await run_in_threadpool(_prepare_kaito, backend, raw)
    kw = body.generate_kwargs
    wanted, param = kw.max_new_tokens, "generate_kwargs.max_new_tokens"
    if wanted is None and kw.max_length is not None:  # transformers' max_length counts the prompt too
        wanted, param = kw.max_length - len(ids), "generate_kwargs.max_length"
        if wanted < 1:
            raise RequestError(
                400, f"{param}: {kw.max_length} leaves no room after a {len(ids)}-token prompt", param=param
            )
    params = SamplingParams(
        # Kaito's default is max_length 200; here 200 new tokens, capped by the service's limit
        max_new_tokens=backend.clamp_new_tokens(ids, wanted, param, default=KAITO_DEFAULT_NEW_TOKENS),
        do_sample=kw.do_sample and kw.temperature > 0,
        temperature=kw.temperature or 1.0,
        top_p=kw.top_p,
        top_k=kw.top_k,
        seed=kw.seed,
    )
    text, _ = await unless_disconnected(request, backend.complete(ids, params, endpoint="chat", adapter=adapter))
    if body.prompt is not None and body.return_full_text:
        text = body.prompt + text
    return JSONResponse({"Result": text})


async def health(request: Request) -> Response:
    """Kaito's runtimes answer ``GET /health`` with ``{"status": "Healthy"}`` once they can serve."""
    if _backend is not None and _backend.ready:
        return JSONResponse({"status": "Healthy"})
    reason = "Unhealthy" if _backend is not None and not _backend.alive else "Loading"
    return JSONResponse({"status": reason}, status_code=503)


def build_app() -> Starlette:
    from serving_bento import openai_api  # a cycle: openai_api imports this module's helpers

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/chat", kaito_chat, methods=["POST"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.list_models, methods=["GET"]),
    ]
    return Starlette(routes=routes)


app = build_app()
