"""Loading a Workspace and checking it with Kaito's rules.

Two passes. The first is pydantic's: shapes, types, enums and unknown fields, each error turned
into ``<path>: <message>`` with Kaito's camelCase names (``tuning.input.urls[0]``). The second
runs only on a well-typed object and applies the rules that relate fields to each other and to
the catalogs (presets, GPU SKUs), again naming the path. Every error of a pass is collected, so a
user fixes a file in one round trip instead of one error at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ValidationError

from api.image_ref import ImageRef
from api.workspace_types import API_VERSIONS, Workspace

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
STRENGTH = re.compile(r"^(0(\.\d+)?|1(\.0+)?|\.\d+)$")
URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class WorkspaceValidationError(ValueError):
    """A Workspace that breaks one or more rules; ``errors`` names each offending path."""

    def __init__(self, errors: list[FieldError], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{where}invalid Workspace ({len(errors)} error{'s' * (len(errors) != 1)}):\n{lines}")


def _format_loc(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _pydantic_errors(exc: ValidationError) -> list[FieldError]:
    errors = []
    for err in exc.errors(include_url=False):
        path = _format_loc(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown field"
            if path == "spec":
                message += " (a Kaito Workspace has resource, inference and tuning at the top level, not under spec)"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "literal_error":
            message = f"must be {err['ctx']['expected']} (got {err['input']!r})"
        elif kind == "string_type" and path.endswith("strength"):
            message = f'must be a quoted decimal string in [0, 1], e.g. "0.5" (got {err["input"]!r})'
        else:
            message = err["msg"][0].lower() + err["msg"][1:]
            if "input" in err and not isinstance(err["input"], dict | list):
                message += f" (got {err['input']!r})"
        errors.append(FieldError(path, message))
    return errors


def _unsupported(model: BaseModel, path: str = "") -> Iterator[FieldError]:
    """Every Kaito field that is set but marked ``x-kaiflow-unsupported`` in the model."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            continue
        alias = field.alias or name
        here = f"{path}.{alias}" if path else alias
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "x-kaiflow-unsupported" in extra:
            yield FieldError(here, f"unsupported: {here} ({extra['x-kaiflow-unsupported']})")
            continue
        if isinstance(value, BaseModel):
            yield from _unsupported(value, here)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _unsupported(item, f"{here}[{i}]")


def _check_url(url: str, path: str) -> Iterator[FieldError]:
    parsed = urlparse(url)
    if parsed.scheme not in URL_SCHEMES:
        yield FieldError(path, f"URL scheme must be one of {', '.join(URL_SCHEMES)} (got {parsed.scheme or 'none'!r} in {url!r})")
    elif parsed.scheme in ("http", "https") and not parsed.netloc:
        yield FieldError(path, f"URL has no host: {url!r}")
    elif parsed.scheme == "file" and not parsed.path:
        yield FieldError(path, f"file URL has no path: {url!r}")


def _check_image(ref: str, path: str) -> Iterator[FieldError]:
    # Placeholders pass: Kaito's own examples carry ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1.
    try:
        ImageRef.parse(ref, allow_placeholders=True)
    except ValueError as exc:
        yield FieldError(path, str(exc))


def _check_volume(volume: dict[str, Any], path: str) -> Iterator[FieldError]:
    if len(volume) != 1:
        yield FieldError(path, f"a volumeSource names exactly one volume type (got {sorted(volume) or 'none'})")


def _check_preset(spec: Any, path: str, *, tuning: bool) -> Iterator[FieldError]:
    from presets import UnknownPresetError, get_preset

    try:
        preset = get_preset(spec.name)
    except UnknownPresetError as exc:
        yield FieldError(f"{path}.name", str(exc))
        return
    if spec.access_mode == "private":
        yield FieldError(f"{path}.accessMode", "unsupported: private access mode (kaiflow loads weights from the model source)")
    if tuning and not preset.tuning:
        yield FieldError(f"{path}.name", f"preset {preset.name!r} does not support tuning")


def _check_resource(ws: Workspace) -> Iterator[FieldError]:
    from presets import UnknownPresetError, get_preset
    from presets.gpus import UnknownSkuError, check_fit

    resource = ws.resource
    if resource is None:
        yield FieldError("resource", "required field is missing (a Workspace needs resource.labelSelector)")
        return
    selector = resource.label_selector
    if not (selector.match_labels or selector.match_expressions):
        yield FieldError("resource.labelSelector", "must have matchLabels or matchExpressions")
    for key, value in (selector.match_labels or {}).items():
        if not value or len(value) > 63:
            yield FieldError(f"resource.labelSelector.matchLabels.{key}", "label values are 1 to 63 characters")
    if resource.instance_type is None or ws.preset_name is None:
        return
    try:
        preset = get_preset(ws.preset_name)
    except UnknownPresetError:
        return  # reported on the preset's own path
    method = ws.tuning.method if ws.tuning else None
    try:
        problem = check_fit(resource.instance_type, preset, method)
    except UnknownSkuError as exc:
        yield FieldError("resource.instanceType", str(exc))
        return
    if problem:
        yield FieldError("resource.instanceType", problem)


def _rules(ws: Workspace) -> Iterator[FieldError]:
    if not DNS1123_LABEL.match(ws.metadata.name) or len(ws.metadata.name) > 63:
        yield FieldError(
            "metadata.name",
            f"must be a DNS-1123 label (lowercase letters, digits, '-', at most 63; it names the Service): {ws.metadata.name!r}",
        )
    if (ws.inference is None) == (ws.tuning is None):
        yield FieldError("", "exactly one of inference, tuning must be set" + (" (both are)" if ws.inference else ""))

    yield from _unsupported(ws)
    yield from _check_resource(ws)

    if ws.inference is not None:
        inference = ws.inference
        if (inference.preset is None) == (inference.template is None):
            yield FieldError("inference", "exactly one of preset, template must be set")
        if inference.preset is not None:
            yield from _check_preset(inference.preset, "inference.preset", tuning=False)
        seen: dict[str, int] = {}
        for i, adapter in enumerate(inference.adapters or []):
            path = f"inference.adapters[{i}]"
            source = adapter.source
            if not source.name:
                yield FieldError(f"{path}.source.name", "required: adapters are addressed by name")
            elif not DNS1123_LABEL.match(source.name):
                yield FieldError(f"{path}.source.name", f"must be a DNS-1123 label: {source.name!r}")
            elif source.name in seen:
                yield FieldError(f"{path}.source.name", f"duplicate adapter name {source.name!r} (also adapters[{seen[source.name]}])")
            else:
                seen[source.name] = i
            if not source.image:
                yield FieldError(f"{path}.source.image", "required: adapters are pulled from an OCI image")
            else:
                yield from _check_image(source.image, f"{path}.source.image")
            if source.urls is not None:
                yield FieldError(f"{path}.source.urls", f"unsupported: {path}.source.urls (adapters come from images)")
            if source.volume_source is not None:
                yield FieldError(f"{path}.source.volumeSource", f"unsupported: {path}.source.volumeSource (adapters come from images)")
            if adapter.strength is not None and not STRENGTH.match(adapter.strength):
                yield FieldError(f"{path}.strength", f'must be a decimal string in [0, 1], e.g. "0.5" (got {adapter.strength!r})')

    if ws.tuning is not None:
        tuning = ws.tuning
        yield from _check_preset(tuning.preset, "tuning.preset", tuning=True)
        given = [k for k in ("urls", "image", "volumeSource") if getattr(tuning.input, _snake(k)) is not None]
        if len(given) != 1:
            yield FieldError("tuning.input", f"exactly one of urls, image, volumeSource must be set (got {given or 'none'})")
        if tuning.input.urls is not None:
            if not tuning.input.urls:
                yield FieldError("tuning.input.urls", "must list at least one URL")
            for i, url in enumerate(tuning.input.urls):
                yield from _check_url(url, f"tuning.input.urls[{i}]")
        if tuning.input.image is not None:
            yield FieldError("tuning.input.image", "unsupported: tuning.input.image (give the dataset as urls or a volumeSource)")
        if tuning.input.volume_source is not None:
            yield from _check_volume(tuning.input.volume_source, "tuning.input.volumeSource")
        output = tuning.output
        if output.image is None and output.volume_source is None:
            yield FieldError("tuning.output.image", "required unless tuning.output.volumeSource is given")
        if output.image is not None and output.volume_source is not None:
            yield FieldError("tuning.output", "set one of image, volumeSource, not both")
        if output.image is not None:
            yield from _check_image(output.image, "tuning.output.image")
        if output.image_push_secret is not None and output.image is None:
            yield FieldError("tuning.output.imagePushSecret", "only meaningful with tuning.output.image")
        if output.volume_source is not None:
            yield from _check_volume(output.volume_source, "tuning.output.volumeSource")
        if tuning.schedule is not None:
            yield from _check_schedule(tuning.schedule)


def _check_schedule(schedule: str) -> Iterator[FieldError]:
    from croniter import croniter

    if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        yield FieldError("tuning.schedule", f"must be a 5-field cron expression such as '0 3 * * 0' (got {schedule!r})")


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def validate_workspace(data: Mapping[str, Any], source: str | None = None) -> Workspace:
    """Parse and check one Workspace object; raise WorkspaceValidationError listing every problem."""
    if not isinstance(data, Mapping):
        raise WorkspaceValidationError([FieldError("", f"a Workspace is a mapping (got {type(data).__name__})")], source)
    api_version = data.get("apiVersion")
    if api_version is not None and api_version not in API_VERSIONS:
        raise WorkspaceValidationError(
            [FieldError("apiVersion", f"must be one of {', '.join(API_VERSIONS)} (got {api_version!r})")], source
        )
    try:
        ws = Workspace.model_validate(data)
    except ValidationError as exc:
        raise WorkspaceValidationError(_pydantic_errors(exc), source) from None
    errors = list(_rules(ws))
    if errors:
        raise WorkspaceValidationError(errors, source)
    return ws


def load_workspaces(path: str | Path) -> list[Workspace]:
    """Every Workspace in a YAML file (multi-document files allowed)."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise WorkspaceValidationError([FieldError("", f"not valid YAML: {exc}")], str(path)) from None
    except OSError as exc:
        raise WorkspaceValidationError([FieldError("", f"cannot read file: {exc.strerror}")], str(path)) from None
    if not documents:
        raise WorkspaceValidationError([FieldError("", "no Workspace in the file")], str(path))
    workspaces, errors = [], []
    for i, doc in enumerate(documents):
        where = str(path) if len(documents) == 1 else f"{path} (document {i + 1})"
        try:
            workspaces.append(validate_workspace(doc, where))
        except WorkspaceValidationError as exc:
            errors.append(exc)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise WorkspaceValidationError([e for exc in errors for e in exc.errors], str(path))
    return workspaces


def load_workspace(source: str | Path | Mapping[str, Any]) -> Workspace:
    """One Workspace from a file path or an already-parsed mapping."""
    if isinstance(source, Mapping):
        return validate_workspace(source)
    workspaces = load_workspaces(source)
    if len(workspaces) != 1:
        raise WorkspaceValidationError([FieldError("", f"expected one Workspace, found {len(workspaces)}")], str(source))
    return workspaces[0]
