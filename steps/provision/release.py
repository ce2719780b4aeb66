"""What the kaiflow operator does with nodes, with the step's own code (the one module of
``steps/`` the controller imports; see pyproject's ``[tool.importlinter]``):

* :func:`request` — create what a Workflow's provision-nodes command line asks for, without
  waiting, before the operator creates the Workflow (whose provision-nodes task then only waits:
  ``--wait-only``). Creating nodes is the operator's right, not a tenant namespace's.
* :func:`release` — delete what provision made for a Workspace: ``python -m steps.provision
  --delete``, the exit handler of hand-submitted Workflows, and the controller's finalizer.
"""

from __future__ import annotations

import dataclasses

from stepkit.common import dataclass_from_args
from stepkit.kube import retry_if_unreachable
from steps.provision.base import ProvisionConfig
from steps.provision.providers import provider_class, provider_options


def request(argv: list[str], *, kubeconfig: str | None = None) -> list[str]:
    """Create (without waiting) what ``python -m steps.provision <argv>`` would; the names requested.

    ``argv`` is the provision-nodes task's command line from the rendered Workflow, parsed with the
    step's own parser (``--wait-only`` in it is ignored here), so the operator and the step agree on
    names, labels, counts and options. Provider settings it lacks come from the environment
    (``$AZURE_SUBSCRIPTION_ID``... for aks), as in the step. Raises like :func:`release`.
    """

    from steps.provision.__main__ import OPTIONS, build_parser  # the CLI module imports this one

    args = build_parser().parse_args([a for a in argv if a != "--wait-only"])
    config = dataclasses.replace(dataclass_from_args(ProvisionConfig, args), wait_only=False,
                                 kubeconfig=kubeconfig)
    config.validate()
    options_class = OPTIONS.get(config.provider)
    options = dataclass_from_args(options_class, args) if options_class else None
    provider = provider_class(config.provider)(config, options)
    return retry_if_unreachable(provider.request)


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
