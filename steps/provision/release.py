"""Releasing what provision made for a Workspace: ``python -m steps.provision --delete``, the
exit handler of hand-submitted Workflows, and the controller's finalizer (the one module of
``steps/`` the controller imports; see pyproject's ``[tool.importlinter]``).
"""

from __future__ import annotations

from stepkit.kube import retry_if_unreachable
from steps.provision.base import ProvisionConfig
from steps.provision.providers import provider_class, provider_options


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
    return retry_if_unreachable(cls(config, provider_options(cls, options)).release)
