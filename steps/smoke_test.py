"""Check a deployed chat service answers (`python -m steps.smoke_test --url URL`).

Two calls, and the DAG fails if either does: a Kaito ``POST /chat`` that must answer 200 with a
``Result`` string, and a streamed OpenAI ``POST /v1/chat/completions`` (the model id taken from
``GET /v1/models``) whose server-sent events must all be JSON chunks, one of them carrying a
``finish_reason``, ending with ``data: [DONE]``. The step checks the service, not the model: a
freshly tuned small model may well answer with its end-of-sequence token first, which is a
working service giving an empty answer (logged as a warning, and the text is in the report).
Readiness is waited for first (``/readyz``, under ``--ready-timeout``), so the step can run right
after a rollout. A bearer key, if the service needs one, is read from the environment variable
named by ``--api-key-env`` and never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from stepkit.common import (
    RetryableError,
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    run_step,
    write_output,
)

log = logging.getLogger("kaiflow.steps.smoke_test")


@dataclass(frozen=True)
class SmokeTestConfig:
    url: str = field(metadata={"help": "the service's base URL (the deploy step's service-url)"})
    model: str = field(default="", metadata={
        "help": "the model id /v1/models must list (Kaito's served name); empty: the first one listed"})
    api_key_env: str = field(default="KAIFLOW_API_KEY", metadata={"help": "env var holding the bearer key, if any"})
    prompt: str = field(default="Say hello in one short sentence.", metadata={"help": "what to ask"})
    max_tokens: int = field(default=16, metadata={"help": "tokens to generate per call"})
    timeout: float = field(default=300.0, metadata={"help": "seconds per call"})
    ready_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for /readyz first"})


def _error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def smoke_test(config: SmokeTestConfig) -> dict[str, object]:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)
    base = config.url.rstrip("/")
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=config.timeout) as client:
        deadline = time.monotonic() + config.ready_timeout
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RetryableError(f"{base}/readyz: not ready after {config.ready_timeout:.0f} s")
            time.sleep(1)
        try:
            started = time.monotonic()
            r = client.post("/chat", json={"prompt": config.prompt, "return_full_text": False,
                                           "generate_kwargs": {"max_new_tokens": config.max_tokens,
                                                               "do_sample": False}})
            if r.status_code != 200:
                raise StepError(f"POST /chat answered {r.status_code}: {_error_message(r)}")
            try:
                result = r.json().get("Result")
            except (ValueError, AttributeError):
                result = None
            if not isinstance(result, str):
                raise StepError(f"POST /chat returned no Result string: {r.text[:200]}")
            chat_seconds = time.monotonic() - started

            models = client.get("/v1/models")
            if models.status_code != 200:
                raise StepError(f"GET /v1/models answered {models.status_code}: {_error_message(models)}")
            try:
                listed = [m["id"] for m in models.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise StepError(f"GET /v1/models returned no model list: {models.text[:200]}") from None
            if config.model and config.model not in listed:
                raise StepError(f"GET /v1/models lists {listed}, not {config.model!r}: clients that send "
                                f"model={config.model!r} (the served name kaiflow presets shows) get 404")
            if not listed:
                raise StepError("GET /v1/models lists no model")
            model = config.model or listed[0]
            started = time.monotonic()
            body = {"model": model, "messages": [{"role": "user", "content": config.prompt}],
                    "max_tokens": config.max_tokens, "temperature": 0, "stream": True}
            pieces, done, first, finish = [], False, None, None
            with client.stream("POST", "/v1/chat/completions", json=body) as s:
                if s.status_code != 200:
                    s.read()
                    raise StepError(f"POST /v1/chat/completions answered {s.status_code}: {_error_message(s)}")
                for line in s.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise StepError(f"the stream sent an event that is not JSON: {data[:200]}") from None
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            first = first or time.monotonic()
                            pieces.append(content)
        except httpx.HTTPError as exc:
            raise RetryableError(f"{base}: request failed: {exc}") from None
        if not done:
            raise StepError("the streamed completion ended without [DONE]")
        if finish is None:
            raise StepError("the streamed completion never gave a finish_reason")
    if not result.strip() or not "".join(pieces).strip():
        log.warning("the model answered with no visible text (chat %r, stream %r)", result, "".join(pieces))
    return {"chat": result, "chat_seconds": round(chat_seconds, 3), "stream": "".join(pieces),
            "stream_chunks": len(pieces), "finish_reason": finish,
            "first_token_seconds": round(first - started, 3) if first else None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steps.smoke_test", description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, SmokeTestConfig)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    report = smoke_test(dataclass_from_args(SmokeTestConfig, args))
    write_output(args.outputs, "smoke-test", report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
