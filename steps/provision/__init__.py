"""provision-nodes: the first DAG step, which makes the Workspace's GPU nodes Ready.

``python -m steps.provision --provider {local,aks,karpenter,existing} ...`` — one provider per
module (``local``, ``existing``, ``aks``, ``karpenter``) behind the small ``base.Provider``
interface; see docs/provisioning.md. :func:`release` (``python -m steps.provision --delete``)
undoes it: the controller's finalizer and a Workflow's ``onExit`` handler call it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from stepkit.common import RetryableError, StepError
from steps.provision.base import PROVIDERS, Provider, ProvisionConfig, ProvisionResult

__all__ = ["PROVIDERS", "Provider", "ProvisionConfig", "ProvisionResult", "RetryableError", "provider_class",
           "provision", "release"]


def provider_class(name: str) -> type[Provider]:
    """The Provider class for ``--provider`` (imported lazily: aks pulls in the Azure SDK)."""
    if name == "local":
        from steps.provision.local import LocalProvider as cls
    elif name == "existing":
        from steps.provision.existing import ExistingProvider as cls
    elif name == "karpenter":
        from steps.provision.karpenter import KarpenterProvider as cls
    elif name == "aks":
        from steps.provision.aks import AKSProvider as cls
    else:
        raise StepError(f"--provider: {name!r} is not one of {', '.join(PROVIDERS)}")
    return cls


def provision(config: ProvisionConfig, options: object = None) -> ProvisionResult:
    config.validate()
    provider = provider_class(config.provider)(config, options)
    return _unreachable_is_retryable(provider.provision)


def release(provider: str, workspace_name: str, namespace: str, *, kubeconfig: str | None = None,
            options: dict | None = None, timeout: float = 300.0, poll_interval: float | None = None) -> list[str]:
    """Delete what the provision step made for the Workspace; the names of what was released.

    Idempotent: what is already gone is not an error (an empty list). ``options`` are the
    provider's own settings by field name (``AKSOptions``: subscription_id, resource_group,
    cluster_name, pool_name, arm_endpoint, ca_bundle; ``KarpenterOptions``); AKS settings not
    given come from ``$AZURE_SUBSCRIPTION_ID``/``$AZURE_RESOURCE_GROUP``/``$AZURE_CLUSTER_NAME``
    as in the step. Waits at most ``timeout`` s, checking every ``poll_interval`` s (default:
    a 60th of the timeout, at most 5 s); raises ``StepError`` (bad input, someone else's
    pool, 4xx) or ``RetryableError`` (deadline passed, API unreachable, 5xx).
    """
    poll = poll_interval if poll_interval is not None else min(5.0, max(0.05, timeout / 60))
    config = ProvisionConfig(provider=provider, workspace_name=workspace_name, namespace=namespace,
                             kubeconfig=kubeconfig, timeout=timeout, poll_interval=poll)
    config.validate()
    cls = provider_class(provider)
    return _unreachable_is_retryable(cls(config, provider_options(cls, options)).release)


def provider_options(cls: type[Provider], options: dict[str, Any] | None) -> Any:
    """``options`` as the provider's options dataclass (unknown keys are named), None if it has none."""
    options_class = cls.options_class
    options = dict(options or {})
    if options_class is None:
        if options:
            raise StepError(f"options: provider {cls.name} takes none, got {', '.join(sorted(options))}")
        return None
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StepError(f"options: {', '.join(unknown)} not known to provider {cls.name} ({', '.join(sorted(known))})")
    for name, variable in getattr(options_class, "ENV", {}).items():
        if options.get(name) is None and os.environ.get(variable):
            options[name] = os.environ[variable]
    return options_class(**options)


def _unreachable_is_retryable(operation: Any) -> Any:
    try:
        return operation()
    except Exception as exc:
        # urllib3 gives up on an unreachable API server after its retries: worth another attempt.
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            raise RetryableError(f"cannot reach the Kubernetes API: {exc}") from None
        raise
