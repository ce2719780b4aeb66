"""provision-nodes: the first DAG step, which makes the Workspace's GPU nodes Ready.

``python -m steps.provision --provider {local,aks,karpenter,existing} ...`` — one provider per
module (``local``, ``existing``, ``aks``, ``karpenter``) behind the small ``base.Provider``
interface; see docs/provisioning.md.
"""

from steps.common import RetryableError  # re-exported: it lived here before steps.common had it
from steps.provision.base import PROVIDERS, Provider, ProvisionConfig, ProvisionResult

__all__ = ["PROVIDERS", "Provider", "ProvisionConfig", "ProvisionResult", "RetryableError", "provider_class", "provision"]


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
        from steps.common import StepError

        raise StepError(f"--provider: {name!r} is not one of {', '.join(PROVIDERS)}")
    return cls


def provision(config: ProvisionConfig, options: object = None) -> ProvisionResult:
    config.validate()
    provider = provider_class(config.provider)(config, options)
    try:
        return provider.provision()
    except Exception as exc:
        # urllib3 gives up on an unreachable API server after its retries: worth another attempt.
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            raise RetryableError(f"cannot reach the Kubernetes API: {exc}") from None
        raise
