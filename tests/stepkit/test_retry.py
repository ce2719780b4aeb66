"""The shared retry policy: transient errors retried with backoff, everything else raised at once."""

from __future__ import annotations

import pytest

from stepkit.retry import TransientError, call_with_retries


def test_transient_errors_are_retried_until_success() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("503")
        return "ok"

    assert call_with_retries(flaky, what="t", attempts=5, backoff_s=0.001) == "ok"
    assert len(calls) == 3


def test_last_transient_error_is_raised_after_the_attempts() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise TransientError(f"refused #{len(calls)}")

    with pytest.raises(TransientError, match="refused #4"):
        call_with_retries(down, what="t", attempts=4, backoff_s=0.001)
    assert len(calls) == 4


@pytest.mark.parametrize("exc", [ValueError("bad input"), KeyError("x"), RuntimeError("bug")])
def test_unclassified_exceptions_are_not_retried(exc: Exception) -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        call_with_retries(broken, what="t", attempts=5, backoff_s=0.001)
    assert len(calls) == 1


def test_retry_on_names_other_transient_classes() -> None:
    calls = []

    def reset() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("reset")
        return "ok"

    assert call_with_retries(reset, what="t", backoff_s=0.001, retry_on=(ConnectionError,)) == "ok"
