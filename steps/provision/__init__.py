"""provision-nodes: the first DAG step, which makes the Workspace's GPU nodes Ready.

``python -m steps.provision --provider {local,aks,karpenter,existing} ...`` — one provider per
module (``local``, ``existing``, ``aks``, ``karpenter``) behind the small ``base.Provider``
interface; see docs/user-guide/provisioning.md. :func:`release` (``python -m steps.provision --delete``)
undoes it (``steps.provision.release``): the controller's finalizer and a Workflow's ``onExit``
handler call it. ``providers`` finds a provider by name.
"""

from __future__ import annotations

from stepkit.common import RetryableError
from stepkit.kube import retry_if_unreachable
from steps.provision.base import PROVIDERS, Provider, ProvisionConfig, ProvisionResult
from steps.provision.providers import provider_class, provider_options
from steps.provision.release import release

__all__ = ["PROVIDERS", "Provider", "ProvisionConfig", "ProvisionResult", "RetryableError", "provider_class",
           "provider_options", "provision", "release"]


def provision(config: ProvisionConfig, options: object = None) -> ProvisionResult:
    config.validate()
    provider = provider_class(config.provider)(config, options)
    return retry_if_unreachable(provider.provision)
