"""A small client of the chat service's Kaito endpoint (``POST /chat``): ``kaiflow chat`` and the demo use it.

It needs only httpx (imported when called), so a CLI can ask a question without loading the
service's own dependencies. Errors are :class:`ChatError`, one line naming the service and what
went wrong, never the API key.
"""

from __future__ import annotations

import os

__all__ = ["ChatError", "chat"]


class ChatError(Exception):
    """The service could not be reached or refused the question."""


def chat(url: str, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.7,
         api_key: str | None = None, timeout: float = 300.0) -> str:
    """One question to the service at ``url``; the answer text.

    ``api_key`` defaults to ``$KAIFLOW_API_KEY`` (sent as a bearer token when set).
    """
    import httpx

    api_key = api_key if api_key is not None else os.environ.get("KAIFLOW_API_KEY", "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"messages": [{"role": "user", "content": prompt}],
            "generate_kwargs": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                "do_sample": temperature > 0}}
    try:
        response = httpx.post(f"{url.rstrip('/')}/chat", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ChatError(f"cannot reach the service at {url}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise ChatError(f"the service answered {response.status_code}: {message}")
    try:
        return response.json()["Result"]
    except (ValueError, KeyError, TypeError):
        raise ChatError(f"the service's answer has no Result: {response.text[:200]}") from None
