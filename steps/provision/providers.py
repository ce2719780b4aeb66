"""The providers by ``--provider`` name, and their options from a plain dict (the controller's)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from stepkit.common import StepError
from steps.provision.base import PROVIDERS, Provider


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
