"""The Workspace CRD, generated from the pydantic model (one definition of the schema).

pydantic's JSON Schema is turned into a Kubernetes *structural* OpenAPI v3 schema: ``$ref`` are
inlined, ``Optional[X]`` (``anyOf: [X, null]``) becomes ``X``, titles and null defaults go, free-form
objects (``volumeSource``, ``template``, unknown status fields) get
``x-kubernetes-preserve-unknown-fields``, and every property ends up with a ``type``. Both served
versions share the schema (the shapes are identical, so no conversion webhook is needed);
``v1beta1`` is the storage version. ``make crds`` writes ``controller/manifests/``; a test fails
when the checked-in files drift from the model.

Kaito's immutable fields become CEL transition rules (``self == oldSelf``), so a real API server
refuses the update; the controller checks the same list (``IMMUTABLE_FIELDS``,
``immutable_changes``) because not every API server evaluates CEL (the test server does not).
"""

from __future__ import annotations

from typing import Any

import yaml

from api.workspace_types import GROUP, KIND, STORAGE_VERSION, VERSIONS, Workspace

PLURAL = "workspaces"
SHORT_NAMES = ["wk", "wks"]
# Kaito's immutable fields (api/v1beta1/workspace_validation.go: validateUpdate), as dotted paths.
IMMUTABLE_FIELDS = (
    "resource.instanceType",
    "resource.labelSelector",
    "inference.preset.name",
    "tuning.preset.name",
    "tuning.method",
)
PRINTER_COLUMNS = [
    {"name": "Instance", "type": "string", "jsonPath": ".resource.instanceType", "description": "GPU instance type"},
    *(
        {"name": cond, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{cond}")].status'}
        for cond in ("ResourceReady", "InferenceReady", "JobStarted", "WorkspaceSucceeded")
    ),
    {"name": "TargetNodeCount", "type": "integer", "jsonPath": ".status.targetNodeCount",
     "description": "GPU nodes the Workspace needs"},
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Pending, Running, Ready, ..."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_DROP = {"title", "x-kaiflow-unsupported", "x-kaiflow-extension"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {len(branches)} types structurally: {node}")
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        if node.get("default") is not None:
            rest["default"] = node["default"]
        return _structural({**branches[0], **rest}, defs)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": the apiserver prunes unknown fields; kaiflow's validation names them
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out[key] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"schema node without a type: {node}")
    return out


def openapi_schema() -> dict[str, Any]:
    schema = Workspace.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    root = _structural(schema, defs)
    root.pop("description", None)
    props = root["properties"]
    # The apiserver owns metadata's schema; status is written by the controller and may grow.
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    props["status"] = {**props["status"], "x-kubernetes-preserve-unknown-fields": True}
    for path in IMMUTABLE_FIELDS:
        node = root
        for part in path.split("."):
            node = node["properties"][part]
        node["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": f"{path} is immutable"}]
    root["required"] = ["apiVersion", "kind", "metadata"]
    root["description"] = "Workspace is the Schema for the workspaces API (kaito.sh), run by kaiflow on Argo Workflows."
    return root


def workspace_crd() -> dict[str, Any]:
    schema = openapi_schema()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "annotations": {"kaiflow.kaito.sh/generated-by": "api.crd (do not edit by hand; run `make crds`)"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["workspace"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": version == STORAGE_VERSION,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
                for version in VERSIONS
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(obj: Any) -> str:
    """YAML without anchors (kubectl and humans read it), keys in the order built."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def crd_yaml() -> str:
    return dump_yaml(workspace_crd())


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def immutable_values(workspace: dict[str, Any]) -> dict[str, Any]:
    """The immutable fields a Workspace sets, by path (what a later update is compared with)."""
    return {path: value for path in IMMUTABLE_FIELDS if (value := _lookup(workspace, path)) is not None}


def immutable_changes(accepted: dict[str, Any], workspace: dict[str, Any]) -> list[str]:
    """Paths of immutable fields whose value differs from ``accepted`` (from ``immutable_values``).

    Like a CEL transition rule, a field is compared only when both sides set it; preset names and
    the method are compared lowercased, as Kaito does.
    """
    current = immutable_values(workspace)
    changed = []
    for path, old in accepted.items():
        new = current.get(path)
        if new is None:
            continue
        if isinstance(old, str) and isinstance(new, str) and not path.startswith("resource."):
            old, new = old.lower(), new.lower()
        if old != new:
            changed.append(path)
    return changed
