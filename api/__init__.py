"""The kaito.sh Workspace API: types, Kaito's validation rules and the generated CRD.

Importable on its own (no controller, no torch): steps, serving, pipelines and the CLI all read
Workspaces through it.
"""

from api.workspace_types import (
    API_VERSIONS,
    GROUP,
    KIND,
    STORAGE_VERSION,
    VERSIONS,
    AdapterSpec,
    Condition,
    DataDestination,
    DataSource,
    InferenceSpec,
    LabelSelector,
    PresetSpec,
    ResourceSpec,
    TuningSpec,
    Workspace,
    WorkspaceStatus,
)
from api.documents import Bundle
from api.workspace_validation import (
    FieldError,
    WorkspaceValidationError,
    load_bundle,
    load_workspace,
    load_workspaces,
    validate_workspace,
)

__all__ = [
    "API_VERSIONS",
    "GROUP",
    "KIND",
    "STORAGE_VERSION",
    "VERSIONS",
    "AdapterSpec",
    "Bundle",
    "Condition",
    "DataDestination",
    "DataSource",
    "FieldError",
    "InferenceSpec",
    "LabelSelector",
    "PresetSpec",
    "ResourceSpec",
    "TuningSpec",
    "Workspace",
    "WorkspaceStatus",
    "WorkspaceValidationError",
    "load_bundle",
    "load_workspace",
    "load_workspaces",
    "validate_workspace",
]
