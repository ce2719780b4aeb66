"""The steps' one retry policy (tenacity): exponential backoff with jitter, for transient errors only.

A step retries a call a few times itself (a dropped connection, a 5xx, a 429 mid-upload); when the
attempts are spent the caller turns the last error into a ``RetryableError`` (exit 1) and the
pipeline's retryStrategy tries the whole step again later. What is *not* transient — bad input,
4xx answers, corrupt data, and any exception nobody classified — is raised at once: retrying an
unexpected exception five times as if it were a network blip only hides the bug.

Callers say what is transient by the exception classes they pass (``retry_on``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

log = logging.getLogger("kaiflow.stepkit.retry")

T = TypeVar("T")

MAX_DELAY_S = 30.0


class TransientError(Exception):
    """A failure worth retrying (connection refused/reset, timeout, 5xx, 429)."""


def call_with_retries(operation: Callable[[], T], *, what: str, attempts: int = 5, backoff_s: float = 1.0,
                      retry_on: tuple[type[BaseException], ...] = (TransientError,),
                      max_delay_s: float = MAX_DELAY_S) -> T:
    """Run ``operation`` until it returns, retrying only ``retry_on`` exceptions, at most ``attempts`` times.

    The delay starts at ``backoff_s``, doubles per retry up to ``max_delay_s``, plus a random jitter
    of 0 to ``0.2 * backoff_s`` seconds (0–0.2 s at the default ``backoff_s`` of 1 s).
    When every attempt failed the last exception is raised unchanged, for the caller to map.
    """
    attempts = max(1, attempts)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: %s; retry %d/%d in %.1f s", what, exc, state.attempt_number, attempts - 1, delay)

    retryer = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=backoff_s, max=max_delay_s) + tenacity.wait_random(0, backoff_s * 0.2),
        retry=tenacity.retry_if_exception_type(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retryer(operation)
