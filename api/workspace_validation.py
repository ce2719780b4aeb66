"""Loading a Workspace and checking it with Kaito's rules.

Two passes. The first is pydantic's: shapes, types, enums and unknown fields, each error turned
into ``<path>: <message>`` with Kaito's camelCase names (``tuning.input.urls[0]``). The second
runs only on a well-typed object and applies the rules that relate fields to each other and to
the catalogs (presets, GPU SKUs), again naming the path. Every error of a pass is collected, so a
user fixes a file in one round trip instead of one error at a time.

Some rules depend on where the Workspace runs (``mode``):

* ``"cluster"`` (``kaiflow validate``/``render``, the controller): dataset URLs are http/https to
  public addresses only (no loopback, private, link-local or cloud-metadata address: the step
  would fetch from inside the cluster), and an output image needs its ``imagePushSecret``;
* ``"local"`` (``kaiflow run``): ``file:`` URLs and 127.0.0.1 registries are the point;
* ``None``: neither set of mode rules (shape and catalog rules only).

Warnings (``FieldError`` too) are for what Kaito accepts and kaiflow does not act on: deprecated
fields, unchecked instance types, a generic HF model whose size is known only at run time.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ValidationError

from api.documents import COMPANION_KINDS, Bundle, DocumentError, parse_documents, read_source
from api.image_ref import ImageRef
from api.labels import ANNOTATION_API_KEY_SECRET, ANNOTATION_OWN_NODES, reserved_node_label
from api.workspace_types import API_VERSIONS, KIND, Workspace
from presets import UnknownPresetError, get_preset
from presets.gpus import UnknownSkuError, check_fit, lookup_sku, pick_instance
from presets.sizing import UnsizedModelError

Mode = Literal["cluster", "local"] | None

# A Service name: a DNS-1123 label that starts with a letter (the Workspace's name is its Service's).
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
STRENGTH = re.compile(r"^(0(\.\d+)?|1(\.0+)?|\.\d+)$")
URL_SCHEMES = ("http", "https", "file")
CLUSTER_URL_SCHEMES = ("http", "https")
MAX_ADAPTERS = 10
MAX_ADAPTER_NAME = 63  # steps.pull_adapters accepts names of at most 63 characters
MAX_URLS = 1000
MAX_URL_LENGTH = 2048
# Names that reach the node's own or the cloud's metadata services rather than the internet.
FORBIDDEN_HOSTNAMES = ("localhost", "metadata", "metadata.google.internal", "metadata.azure.com")
# Azure's wireserver is neither private nor link-local but answers only from inside Azure.
FORBIDDEN_ADDRESSES = (ipaddress.ip_address("168.63.129.16"),)


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


def _forbidden_address(host: str) -> str | None:
    """Why a cluster step must not fetch from ``host``, or None."""
    name = host.lower().rstrip(".")
    if name in FORBIDDEN_HOSTNAMES or name.endswith((".localhost", ".internal")):
        return f"{host!r} is a local or metadata host name"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if not re.fullmatch(r"[0-9a-fx.]+", name) or not re.search(r"\d", name):
            return None
        try:  # 0x7f.1, 2130706433 and other forms that inet_aton (and curl) read as IPv4
            address = ipaddress.ip_address(socket.inet_aton(name))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if address in FORBIDDEN_ADDRESSES:
        return f"{address} is a cloud metadata address"
    return None


def _check_url(url: str, path: str, mode: Mode) -> Iterator[FieldError]:
    if len(url) > MAX_URL_LENGTH:
        yield FieldError(path, f"URL is {len(url)} characters, over {MAX_URL_LENGTH}")
        return
    parsed = urlparse(url)
    schemes = CLUSTER_URL_SCHEMES if mode == "cluster" else URL_SCHEMES
    if parsed.scheme not in schemes:
        hint = " (file: URLs are for `kaiflow run` on this machine)" if mode == "cluster" and parsed.scheme == "file" else ""
        yield FieldError(path, f"URL scheme must be one of {', '.join(schemes)} (got {parsed.scheme or 'none'!r} in {url!r}){hint}")
    elif parsed.scheme in ("http", "https") and not parsed.hostname:
        yield FieldError(path, f"URL has no host: {url!r}")
    elif parsed.scheme == "file" and not parsed.path:
        yield FieldError(path, f"file URL has no path: {url!r}")
    elif mode == "cluster" and (why := _forbidden_address(parsed.hostname or "")):
        yield FieldError(path, f"a cluster run fetches from public addresses only: {why} (in {url!r})")


def _check_image(ref: str, path: str) -> Iterator[FieldError]:
    # Placeholders pass: Kaito's own examples carry ACR_REPO_HERE.azurecr.io/ADAPTER_HERE:0.0.1.
    try:
        ImageRef.parse(ref, allow_placeholders=True)
    except ValueError as exc:
        yield FieldError(path, str(exc))


def _check_volume(volume: dict[str, Any], path: str) -> Iterator[FieldError]:
    if len(volume) != 1:
        yield FieldError(path, f"a volumeSource names exactly one volume type (got {sorted(volume) or 'none'})")


def _templated_strings(value: Any, path: str = "") -> Iterator[FieldError]:
    """``{{`` anywhere: Argo evaluates it in the rendered Workflow, so it is never passed through."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if "{{" in str(key):
                yield FieldError(here, "keys must not contain '{{' (Argo would evaluate it as a template expression)")
            yield from _templated_strings(item, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _templated_strings(item, f"{path}[{i}]")
    elif isinstance(value, str) and "{{" in value:
        yield FieldError(path, f"must not contain '{{{{' (Argo would evaluate it as a template expression): {value[:80]!r}")


def _deprecated(ws: Workspace) -> Iterator[FieldError]:
    """Fields Kaito v1beta1 deprecates and ignores: accepted, with a warning each."""
    for where, spec in (("inference.preset", ws.inference and ws.inference.preset), ("tuning.preset", ws.tuning and ws.tuning.preset)):
        if not spec:
            continue
        if spec.access_mode is not None:
            yield FieldError(f"{where}.accessMode", "deprecated in Kaito v1beta1 and ignored: kaiflow loads weights from the model source")
        options = spec.preset_options
        if options is not None and options.image is not None:
            yield FieldError(f"{where}.presetOptions.image", "deprecated in Kaito v1beta1 and ignored: kaiflow loads weights from the model source")
        if options is not None and options.image_pull_secrets:
            yield FieldError(f"{where}.presetOptions.imagePullSecrets", "deprecated in Kaito v1beta1 and ignored (no model image is pulled)")
    if ws.resource is not None and ws.resource.preferred_nodes:
        yield FieldError("resource.preferredNodes", "deprecated in Kaito v1beta1; kaiflow still tries these nodes first")


def _check_preset(spec: Any, path: str, *, tuning: bool, warnings: list[FieldError]) -> Iterator[FieldError]:
    try:
        preset = get_preset(spec.name)
    except UnknownPresetError as exc:
        yield FieldError(f"{path}.name", str(exc))
        return
    if not preset.sized:
        warnings.append(FieldError(f"{path}.name", f"generic HuggingFace model {preset.name!r}: its size is unknown offline, "
                                   "so sizing is deferred to the tune/serve step, which checks fit from its config.json"))
    if tuning and not preset.tuning:
        why = f"its weights are stored pre-quantised ({preset.quantization})" if preset.quantization else \
            "peft has no default LoRA target modules for its architecture" if preset.origin == "kaito-catalog" else ""
        yield FieldError(f"{path}.name", f"preset {preset.name!r} does not support tuning" + (f": {why}" if why else ""))


def _check_selector(selector: Any, *, provisioning: bool = True) -> Iterator[FieldError]:
    if not (selector.match_labels or selector.match_expressions):
        yield FieldError("resource.labelSelector", "must have matchLabels or matchExpressions")
    reserved = ("a label kaiflow sets on the nodes it provisions (release and the status find a Workspace's "
                "nodes by it): use another key")
    for key, value in (selector.match_labels or {}).items():
        if not value or len(value) > 63:
            yield FieldError(f"resource.labelSelector.matchLabels.{key}", "label values are 1 to 63 characters")
        if reserved_node_label(key, provisioning=provisioning):
            yield FieldError(f"resource.labelSelector.matchLabels.{key}", f"{key} is {reserved}")
    for i, expression in enumerate(selector.match_expressions or []):
        if reserved_node_label(expression.key or "", provisioning=provisioning):
            yield FieldError(f"resource.labelSelector.matchExpressions[{i}].key", f"{expression.key} is {reserved}")
        if expression.operator != "In" or len(expression.values or []) != 1:
            yield FieldError(
                f"resource.labelSelector.matchExpressions[{i}]",
                f"Kaito accepts only the operator In with exactly one value (got {expression.operator} "
                f"with {len(expression.values or [])} values): the nodes it provisions carry that label",
            )


def _check_resource(ws: Workspace, warnings: list[FieldError]) -> Iterator[FieldError]:
    from api.defaults import uses_own_nodes

    resource = ws.resource
    if resource is None:
        yield FieldError("resource", "required field is missing (a Workspace needs resource.labelSelector)")
        return
    own_nodes = uses_own_nodes(ws)
    yield from _check_selector(resource.label_selector, provisioning=not own_nodes)
    if ws.tuning is not None and resource.count > 1:
        yield FieldError("resource.count", f"tuning runs on one node (got {resource.count}), as in Kaito")
    if own_nodes and resource.instance_type:
        yield FieldError("resource.instanceType", "must be empty with bring-your-own nodes (annotation "
                         f"{ANNOTATION_OWN_NODES}: \"true\"): the nodes labelSelector matches are used")
        return
    if ws.preset_name is None:
        return
    try:
        preset = get_preset(ws.preset_name)
    except UnknownPresetError:
        return  # reported on the preset's own path
    method = ws.tuning.method if ws.tuning else None
    if own_nodes:
        return
    if resource.instance_type is None:
        if not preset.sized:
            yield FieldError("resource.instanceType", f"required for {preset.name}: a generic HuggingFace model's size is "
                             "unknown offline, so kaiflow cannot pick a SKU")
            return
        try:
            pick_instance(preset, method)
        except ValueError as exc:
            if method:
                yield FieldError("resource.instanceType", f"{exc} on one GPU, where {method} tuning runs"
                                 + ("; qlora needs less" if method == "lora" else ""))
            else:
                yield FieldError("resource.instanceType", f"unsupported: multi-node inference: {exc} on one node, and "
                                 "kaiflow serves a model on one node (Kaito would spread it over several)")
        return
    try:
        sku = lookup_sku(resource.instance_type)
    except UnknownSkuError as exc:
        yield FieldError("resource.instanceType", f"{exc}; other Azure names must start with Standard_N or Standard_D")
        return
    if sku is None:
        warnings.append(FieldError("resource.instanceType", f"{resource.instance_type} is not in kaiflow's SKU table: "
                                   "accepted without a GPU memory check (pods request one GPU)"))
        return
    if sku.vendor != "nvidia":
        yield FieldError("resource.instanceType", f"unsupported: {sku.describe()} ({sku.vendor.upper()}); kaiflow's pods "
                         "request nvidia.com/gpu")
        return
    if not preset.sized:
        return
    try:
        problem = check_fit(resource.instance_type, preset, method)
    except UnsizedModelError:
        return
    if problem and method is None and "such nodes" in problem:
        try:
            better = f"; a SKU that holds it on one node: {pick_instance(preset, None).name}"
        except ValueError:
            better = "; no SKU in the table holds it on one node"
        yield FieldError("resource.instanceType", f"unsupported: multi-node inference: {problem}{better}")
    elif problem:
        yield FieldError("resource.instanceType", problem)


def _check_adapters(inference: Any) -> Iterator[FieldError]:
    adapters = inference.adapters or []
    if len(adapters) > MAX_ADAPTERS:
        yield FieldError("inference.adapters", f"at most {MAX_ADAPTERS} adapters, as in Kaito (got {len(adapters)})")
    seen: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        path = f"inference.adapters[{i}]"
        source = adapter.source
        if not source.name:
            yield FieldError(f"{path}.source.name", "required: adapters are addressed by name")
        elif not DNS1123_SUBDOMAIN.match(source.name) or len(source.name) > 253:
            yield FieldError(f"{path}.source.name", f"must be a DNS-1123 subdomain (lowercase letters, digits, '-', '.'): {source.name!r}")
        elif len(source.name) > MAX_ADAPTER_NAME:
            yield FieldError(f"{path}.source.name", f"at most {MAX_ADAPTER_NAME} characters in kaiflow: the name is also the "
                             f"adapter's folder and served model name (got {len(source.name)})")
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


def _check_tuning(tuning: Any, mode: Mode) -> Iterator[FieldError]:
    given = [k for k in ("urls", "image", "volumeSource") if getattr(tuning.input, _snake(k)) is not None]
    if len(given) != 1:
        yield FieldError("tuning.input", f"exactly one of urls, image, volumeSource must be set (got {given or 'none'})")
    if tuning.input.urls is not None:
        if not tuning.input.urls:
            yield FieldError("tuning.input.urls", "must list at least one URL")
        if len(tuning.input.urls) > MAX_URLS:
            yield FieldError("tuning.input.urls", f"at most {MAX_URLS} URLs (got {len(tuning.input.urls)}); pack the data into fewer files")
        else:
            for i, url in enumerate(tuning.input.urls):
                yield from _check_url(url, f"tuning.input.urls[{i}]", mode)
    if tuning.input.image is not None:
        yield FieldError("tuning.input.image", "unsupported: tuning.input.image (give the dataset as urls)")
    if tuning.input.volume_source is not None:
        yield from _check_volume(tuning.input.volume_source, "tuning.input.volumeSource")
        yield FieldError("tuning.input.volumeSource", "unsupported: tuning.input.volumeSource (the pipeline's fetch step "
                         "reads urls; give the dataset as tuning.input.urls)")
    output = tuning.output
    if output.image is None and output.volume_source is None:
        yield FieldError("tuning.output.image", "required unless tuning.output.volumeSource is given")
    if output.image is not None and output.volume_source is not None:
        yield FieldError("tuning.output", "set one of image, volumeSource, not both")
    if output.image is not None:
        yield from _check_image(output.image, "tuning.output.image")
        if mode == "cluster" and output.image_push_secret is None:
            yield FieldError("tuning.output.imagePushSecret", "required with tuning.output.image in a cluster: the "
                             "docker-config Secret the push step uses (as in Kaito)")
    if output.image_push_secret is not None and output.image is None:
        yield FieldError("tuning.output.imagePushSecret", "only meaningful with tuning.output.image")
    if output.volume_source is not None:
        yield from _check_volume(output.volume_source, "tuning.output.volumeSource")
        yield FieldError("tuning.output.volumeSource", "unsupported: tuning.output.volumeSource (the pipeline pushes the "
                         "adapter to an OCI image; set tuning.output.image)")
    if tuning.schedule is not None:
        yield from _check_schedule(tuning.schedule)


def _rules(ws: Workspace, mode: Mode, warnings: list[FieldError]) -> Iterator[FieldError]:
    if not DNS1035_LABEL.match(ws.metadata.name) or len(ws.metadata.name) > 63:
        yield FieldError(
            "metadata.name",
            "must be a DNS-1035 label, a DNS-1123 label with a letter first (lowercase letters, digits, '-', "
            f"at most 63; it names the Service and labels the nodes): {ws.metadata.name!r}",
        )
    if (ws.inference is None) == (ws.tuning is None):
        yield FieldError("", "exactly one of inference, tuning must be set" + (" (both are)" if ws.inference else ""))
    key_secret = (ws.metadata.annotations or {}).get(ANNOTATION_API_KEY_SECRET)
    if key_secret is not None and (not DNS1123_SUBDOMAIN.match(key_secret) or len(key_secret) > 253):
        yield FieldError(f"metadata.annotations[{ANNOTATION_API_KEY_SECRET}]",
                         f"must name a Secret (a DNS-1123 subdomain), got {key_secret!r}")

    yield from _unsupported(ws)
    warnings.extend(_deprecated(ws))
    yield from _check_resource(ws, warnings)

    if ws.inference is not None:
        inference = ws.inference
        if (inference.preset is None) == (inference.template is None):
            yield FieldError("inference", "exactly one of preset, template must be set")
        if inference.preset is not None:
            yield from _check_preset(inference.preset, "inference.preset", tuning=False, warnings=warnings)
        yield from _check_adapters(inference)

    if ws.tuning is not None:
        yield from _check_preset(ws.tuning.preset, "tuning.preset", tuning=True, warnings=warnings)
        yield from _check_tuning(ws.tuning, mode)


# Argo's CronWorkflow parser (robfig/cron with Descriptor) takes these besides 5-field expressions.
CRON_SPECIALS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _check_schedule(schedule: str) -> Iterator[FieldError]:
    from croniter import croniter

    text = schedule.strip()
    if text in CRON_SPECIALS:
        return
    if text.startswith("@every"):
        duration = text[len("@every"):].strip()
        if _GO_DURATION.match(duration) and any(ch in "123456789" for ch in duration):
            return
        yield FieldError("tuning.schedule", f"@every needs a Go duration such as '@every 6h' or '@every 1h30m' (got {schedule!r})")
        return
    if len(text.split()) != 5 or not croniter.is_valid(text):
        yield FieldError("tuning.schedule", f"must be a 5-field cron expression such as '0 3 * * 0', or one of Argo's "
                         f"{', '.join(CRON_SPECIALS)}, '@every <duration>' (got {schedule!r})")


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def validate_workspace(data: Mapping[str, Any], source: str | None = None, *, mode: Mode = None,
                       warnings: list[FieldError] | None = None,
                       companions: list[Mapping[str, Any]] | None = None) -> Workspace:
    """Parse and check one Workspace object; raise WorkspaceValidationError listing every problem.

    ``warnings``, when given, collects what is accepted but not acted on; ``companions`` are the
    other documents of the same file (ConfigMaps, PVCs) that ``tuning.config``/``inference.config``
    may name.
    """
    if not isinstance(data, Mapping):
        raise WorkspaceValidationError([FieldError("", f"a Workspace is a mapping (got {type(data).__name__})")], source)
    api_version = data.get("apiVersion")
    if api_version is not None and api_version not in API_VERSIONS:
        raise WorkspaceValidationError(
            [FieldError("apiVersion", f"must be one of {', '.join(API_VERSIONS)} (got {api_version!r})")], source
        )
    templated = list(_templated_strings(data))
    if templated:
        raise WorkspaceValidationError(templated, source)
    try:
        ws = Workspace.model_validate(data)
    except ValidationError as exc:
        raise WorkspaceValidationError(_pydantic_errors(exc), source) from None
    found: list[FieldError] = []
    errors = list(_rules(ws, mode, found))
    errors += _check_configs(ws, companions or [], mode, found)
    if errors:
        raise WorkspaceValidationError(errors, source)
    if warnings is not None:
        warnings.extend(found)
    return ws


def _check_configs(ws: Workspace, companions: list[Mapping[str, Any]], mode: Mode, warnings: list[FieldError]) -> list[FieldError]:
    """A ConfigMap named by tuning.config / inference.config, when the same file carries it."""
    from api.inference_config import CONFIG_KEY, read_inference_config

    def config_map(name: str) -> Mapping[str, Any] | None:
        return next((d for d in companions if d.get("kind") == "ConfigMap" and (d.get("metadata") or {}).get("name") == name), None)

    errors: list[FieldError] = []
    if ws.tuning is not None and ws.tuning.config:
        found = config_map(ws.tuning.config)
        if found is not None and "training_config.yaml" not in (found.get("data") or {}):
            errors.append(FieldError("tuning.config", f"ConfigMap {ws.tuning.config!r} in this file has no data key "
                                     f"training_config.yaml (found {sorted(found.get('data') or {}) or 'none'})"))
    if ws.inference is not None and ws.inference.config:
        found = config_map(ws.inference.config)
        if found is None:
            if mode != "local":
                warnings.append(FieldError("inference.config", f"ConfigMap {ws.inference.config!r} is not in this file: its keys "
                                           "are neither checked nor applied (keep it in the Workspace's file)"))
            else:
                errors.append(FieldError("inference.config", f"ConfigMap {ws.inference.config!r} must be in the same file "
                                         "for a local run"))
        else:
            try:
                settings = read_inference_config(dict(found))
            except ValueError as exc:
                errors.append(FieldError("inference.config", f"ConfigMap {ws.inference.config!r}: {exc}"))
            else:
                for key in settings.ignored:
                    warnings.append(FieldError("inference.config", f"{CONFIG_KEY} key {key!r} has no effect on kaiflow's "
                                               "transformers runtime (ignored)"))
    return errors


def load_bundle(source: str | Path, *, mode: Mode = None, data: bytes | None = None,
                namespace: str | None = None) -> Bundle:
    """Every Workspace in a file (``-``: standard input) with its companion ConfigMaps and PVCs.

    Raises WorkspaceValidationError with every problem of every document; the returned bundle
    carries the warnings. ``namespace`` (``kaiflow ... -n NS``) is given to every object that names
    none; an object naming another one is refused, as ``kubectl apply -n`` refuses it.
    """

    name = str(source)
    try:
        if data is None:
            data, name = read_source(source)
        documents = parse_documents(data)
    except DocumentError as exc:
        raise WorkspaceValidationError([FieldError("", str(exc))], name) from None
    if not documents:
        raise WorkspaceValidationError([FieldError("", "no Workspace in the file")], name)
    bundle = Bundle(source=name)
    errors: list[FieldError] = []
    candidates: list[tuple[int, Any]] = []
    for i, doc in enumerate(documents, 1):
        prefix = f"document {i}: " if len(documents) > 1 else ""
        kind = doc.get("kind") if isinstance(doc, Mapping) else None
        if namespace and isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            given = doc["metadata"].get("namespace")
            if given and given != namespace:
                errors.append(FieldError("metadata.namespace", f"{prefix}the namespace in the file ({given!r}) does not "
                                         f"match the namespace given with -n ({namespace!r})"))
                continue
            doc["metadata"]["namespace"] = namespace
        if kind in COMPANION_KINDS:
            if doc.get("apiVersion") != "v1" or not isinstance(doc.get("metadata"), Mapping) or not doc["metadata"].get("name"):
                errors.append(FieldError("", f"{prefix}a {kind} needs apiVersion v1 and metadata.name"))
            else:
                bundle.companions.append(dict(doc))
        elif kind == "Secret":  # passed through untouched; the message never shows its data
            if doc.get("apiVersion") != "v1" or not isinstance(doc.get("metadata"), Mapping) or not doc["metadata"].get("name"):
                errors.append(FieldError("", f"{prefix}a Secret needs apiVersion v1 and metadata.name"))
            else:
                bundle.secrets.append(doc)
        elif kind is None or kind == KIND:
            candidates.append((i, doc))
        else:
            errors.append(FieldError("kind", f"{prefix}must be '{KIND}' (or a companion ConfigMap, PersistentVolumeClaim or Secret), got {kind!r}"))
    if not candidates and not errors:
        errors.append(FieldError("", "no Workspace in the file"))
    for i, doc in candidates:
        where = name if len(documents) == 1 else f"{name} (document {i})"
        warnings: list[FieldError] = []
        try:
            bundle.workspaces.append(validate_workspace(doc, where, mode=mode, warnings=warnings, companions=bundle.companions))
        except WorkspaceValidationError as exc:
            errors.extend(exc.errors)
        bundle.warnings.extend(warnings)
    if errors:
        raise WorkspaceValidationError(errors, name)
    return bundle


def load_workspaces(path: str | Path, *, mode: Mode = None) -> list[Workspace]:
    """Every Workspace in a YAML file (multi-document files allowed, companions skipped)."""
    return load_bundle(path, mode=mode).workspaces


def load_workspace(source: str | Path | Mapping[str, Any], *, mode: Mode = None) -> Workspace:
    """One Workspace from a file path or an already-parsed mapping."""
    if isinstance(source, Mapping):
        return validate_workspace(source, mode=mode)
    workspaces = load_workspaces(source, mode=mode)
    if len(workspaces) != 1:
        raise WorkspaceValidationError([FieldError("", f"expected one Workspace, found {len(workspaces)}")], str(source))
    return workspaces[0]
