"""Registry errors and how they map to exit codes (see DEVELOPERS.md)."""

from __future__ import annotations

from stepkit.common import RetryableError, StepError
from stepkit.retry import TransientError

__all__ = ["CorruptTransferError", "RegistryAuthError", "RegistryError", "RegistryNotFoundError",
           "RegistryUnavailableError", "TransientError"]


class RegistryError(StepError):
    """A registry operation failed; the message names registry and repository, never a secret."""


class RegistryAuthError(RegistryError):
    """401/403, or the registry wants credentials the docker config does not have."""


class RegistryNotFoundError(RegistryError):
    """404: repository, tag, manifest or blob unknown to the registry."""


class RegistryUnavailableError(RegistryError, RetryableError):
    """Connection errors or 5xx answers outlasted every retry: exit 1, the pipeline tries again later."""


class CorruptTransferError(TransientError):
    """A blob arrived with the wrong size or digest: retried like a dropped connection, but when
    every attempt ends so, the registry's copy is corrupt and retrying the step will not help."""
