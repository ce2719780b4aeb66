"""Structural checks of a rendered Workflow, CronWorkflow or WorkflowTemplate.

No Argo binary runs here, and Argo's own schema is loose (Hera's model of it accepts unknown keys
and nameless templates), so two layers guard what we render:

1. Hera's pydantic models of Argo's types (``hera.workflows.models``): every known field has the
   right type, and no field is unknown (Hera's models ignore unknown keys; Argo's API schema is
   strict, so a misspelled ``automountServiceAccountTokn`` would only fail at submit time).
2. The checks below, which are what Argo's controller would only find at run time:

   * the entrypoint and every task's template exist; template and task names are unique;
   * every name in a ``depends`` expression is a task of the same DAG, and the DAG has no cycle;
   * a task passes exactly the input parameters its template declares without a default;
   * every ``{{...}}`` reference is defined where it is used: ``inputs.parameters.X`` among the
     template's inputs, ``workflow.parameters.X`` among the workflow's arguments,
     ``tasks.T.outputs.parameters.X`` an output of a task ``T`` that runs *before* (an ancestor in
     the DAG) - otherwise Argo fails the task with "unable to resolve";
   * every ``{{...}}`` anywhere in the manifest - annotations included, whatever its case - is
     one of the above or an Argo global; ``{{INPUTS.PARAMETERS.METHOD}}`` is refused;
   * every volume mount names a volume or a volumeClaimTemplate; output parameters have a path;
   * volume names are DNS-1123 labels (a Secret named ``acr.push`` must not become one as is),
     template and task names follow Argo's rule; every emptyDir has a ``sizeLimit``; Prometheus
     metrics have valid names, a help text and non-empty labels (``{{outputs.parameters.X}}``,
     ``{{duration}}`` and ``{{status}}`` are defined inside a template's ``metrics``).

``problems(manifest)`` returns every finding as ``"<where>: <what>"``; ``check(manifest)`` raises
``StructureError`` listing them.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pipelines.names import is_dns1123_label

# An Argo expression reference, {{ ... }} (the local runner evaluates them with the same pattern).
REFERENCE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
DEPENDS_TOKEN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z]+)?|&&|\|\||!|\(|\)")
TASK_RESULTS = {"Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned", "AnySucceeded", "AllFailed"}
# Argo globals our templates may use; anything else must be declared.
GLOBAL_VARIABLES = {"pod.name", "workflow.name", "workflow.namespace", "workflow.uid", "workflow.creationTimestamp",
                    "workflow.status", "workflow.duration", "workflow.failures", "retries"}
# What Argo defines inside a template's own ``metrics`` (besides its inputs and outputs).
METRIC_VARIABLES = {"duration", "status", "exitCode"}
# Argo's own rule for template and task names.
ARGO_NAME = re.compile(r"^[a-zA-Z0-9][-a-zA-Z0-9]*$")
ARGO_NAME_MAX = 128
PROMETHEUS_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class StructureError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid pipeline structure:\n" + "\n".join(f"  - {p}" for p in problems))


def workflow_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The spec that holds the templates (a CronWorkflow nests it in ``workflowSpec``)."""
    spec = manifest.get("spec", {})
    return spec.get("workflowSpec", spec) if manifest.get("kind") == "CronWorkflow" else spec


def depends_names(expression: str) -> list[str]:
    """Task names in an Argo ``depends`` expression (``a && (b.Succeeded || c.Failed)``)."""
    names = []
    for token in DEPENDS_TOKEN.findall(expression):
        if token in {"&&", "||", "!", "(", ")"}:
            continue
        names.append(token.split(".", 1)[0])
    return names


def task_dependencies(task: dict[str, Any]) -> list[str]:
    if "depends" in task:
        return depends_names(task["depends"])
    return list(task.get("dependencies") or [])


def topological_order(tasks: list[dict[str, Any]]) -> list[str]:
    """Task names in dependency order (ties kept in declaration order); ValueError on a cycle."""
    deps = {t["name"]: [d for d in task_dependencies(t)] for t in tasks}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError("cycle: " + " -> ".join([*path[path.index(name):], name]))
        state[name] = 1
        for dep in deps.get(name, []):
            if dep in deps:
                visit(dep, [*path, name])
        state[name] = 2
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def ancestors(tasks: list[dict[str, Any]]) -> dict[str, set[str]]:
    deps = {t["name"]: [d for d in task_dependencies(t) if d] for t in tasks}
    result: dict[str, set[str]] = {}

    def collect(name: str) -> set[str]:
        if name not in result:
            result[name] = set()
            for dep in deps.get(name, []):
                result[name] |= {dep} | collect(dep)
        return result[name]

    for name in deps:
        collect(name)
    return result


def _schema_problems(manifest: dict[str, Any]) -> Iterator[str]:
    from hera.workflows import models
    from pydantic import ValidationError

    model = {"Workflow": models.Workflow, "CronWorkflow": models.CronWorkflow,
             "WorkflowTemplate": models.WorkflowTemplate}.get(manifest.get("kind", ""))
    if model is None:
        yield f"kind: expected Workflow, CronWorkflow or WorkflowTemplate (got {manifest.get('kind')!r})"
        return
    try:
        model.model_validate(manifest)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            yield f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    yield from _unknown_fields(manifest, model, "")


def _model_of(annotation: Any) -> Any:
    """The pydantic model, ``list[...]`` or ``dict[...]`` a field holds (None for scalars)."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _model_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
        return None
    if origin in (list, dict):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unknown_fields(value: Any, annotation: Any, path: str) -> Iterator[str]:
    """Keys Argo's strict schema would reject: Hera's models ignore them, Argo's API does not."""
    from pydantic import RootModel

    kind = _model_of(annotation)
    if kind is None:
        return
    origin = typing.get_origin(kind)
    if origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _unknown_fields(item, typing.get_args(kind)[0], f"{path}[{i}]")
    elif origin is dict and isinstance(value, dict):
        item_type = typing.get_args(kind)[1] if typing.get_args(kind) else None
        for key, item in value.items():
            yield from _unknown_fields(item, item_type, f"{path}.{key}")
    elif isinstance(kind, type) and issubclass(kind, RootModel):
        yield from _unknown_fields(value, kind.model_fields["root"].annotation, path)
    elif isinstance(value, dict):
        fields = {(f.alias or name): f.annotation for name, f in kind.model_fields.items()}
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key not in fields:
                yield f"{where}: unknown field (Argo's schema rejects it)"
            else:
                yield from _unknown_fields(item, fields[key], where)


def _references(value: Any) -> Iterator[str]:
    """Every ``{{...}}`` in a value, whatever its case; a stray ``{{``/``}}`` comes back as itself."""
    if isinstance(value, str):
        yield from REFERENCE.findall(value)
        rest = REFERENCE.sub("", value)
        if "{{" in rest or "}}" in rest:
            yield rest.strip()
    elif isinstance(value, dict):
        for item in value.values():
            yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


def _check_reference(ref: str, where: str, *, inputs: set[str], workflow_params: set[str],
                     outputs_of: dict[str, set[str]] | None = None, before: set[str] | None = None,
                     own_outputs: set[str] | None = None) -> Iterator[str]:
    """``own_outputs`` is given inside a template's ``metrics``, where its outputs are defined."""
    if ref in GLOBAL_VARIABLES or (own_outputs is not None and ref in METRIC_VARIABLES):
        return
    if "{{" in ref or "}}" in ref:
        yield f"{where}: unbalanced braces in {ref!r}"
        return
    parts = ref.split(".")
    if own_outputs is not None and parts[:2] == ["outputs", "parameters"] and len(parts) == 3:
        if parts[2] not in own_outputs:
            yield f"{where}: {{{{{ref}}}}} is not an output parameter of the template"
        return
    if parts[:2] == ["inputs", "parameters"] and len(parts) == 3:
        if parts[2] not in inputs:
            yield f"{where}: {{{{{ref}}}}} is not an input parameter of the template"
    elif parts[:2] == ["workflow", "parameters"] and len(parts) == 3:
        if parts[2] not in workflow_params:
            yield f"{where}: {{{{{ref}}}}} is not a workflow argument"
    elif parts[0] == "tasks" and len(parts) == 5 and parts[2:4] == ["outputs", "parameters"]:
        task, output = parts[1], parts[4]
        if outputs_of is None or task not in outputs_of:
            yield f"{where}: {{{{{ref}}}}} names no task of this DAG"
        elif before is not None and task not in before:
            yield f"{where}: {{{{{ref}}}}} reads task {task!r}, which does not run before it"
        elif output not in outputs_of[task]:
            yield f"{where}: {{{{{ref}}}}}: task {task!r} has no output parameter {output!r}"
    else:
        yield f"{where}: unknown reference {{{{{ref}}}}}"


def problems(manifest: dict[str, Any]) -> list[str]:
    found = list(_schema_problems(manifest))
    spec = workflow_spec(manifest)
    templates = spec.get("templates") or []
    by_name: dict[str, dict[str, Any]] = {}
    for i, template in enumerate(templates):
        name = template.get("name")
        if not name:
            found.append(f"templates[{i}]: template has no name")
        elif name in by_name:
            found.append(f"templates[{i}]: duplicate template name {name!r}")
        else:
            by_name[name] = template
    if spec.get("entrypoint") and spec["entrypoint"] not in by_name:
        found.append(f"entrypoint: no template named {spec['entrypoint']!r}")
    workflow_params = {p["name"] for p in (spec.get("arguments") or {}).get("parameters") or []}
    volumes = {v["name"] for v in spec.get("volumes") or []}
    volumes |= {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []}

    def template_inputs(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in (template.get("inputs") or {}).get("parameters") or []}

    def template_outputs(template: dict[str, Any]) -> set[str]:
        return {p["name"] for p in (template.get("outputs") or {}).get("parameters") or []}

    # Outside the templates only workflow-level variables exist (metadata, volumes, onExit, ...).
    # The object's own annotations are bookkeeping Argo never evaluates (the controller keeps JSON
    # there, whose "}}" is no placeholder); its labels and everything in the spec are checked.
    outside = {"metadata": {k: v for k, v in (manifest.get("metadata") or {}).items() if k != "annotations"}}
    outside |= {k: v for k, v in manifest.get("spec", {}).items() if k not in ("workflowSpec", "templates")}
    outside |= {k: v for k, v in spec.items() if k != "templates"}
    for key, value in outside.items():
        for ref in _references(value):
            found += _check_reference(ref, key, inputs=set(), workflow_params=workflow_params)
    found += _name_problems(spec, by_name)
    if spec.get("onExit") and spec["onExit"] not in by_name:
        found.append(f"onExit: no template named {spec['onExit']!r}")
    entry = by_name.get(spec.get("entrypoint"))
    if entry is not None and "dag" not in entry:
        # Argo fills the entrypoint's inputs from the workflow's arguments (argo submit -p ...).
        for param_name, param in template_inputs(entry).items():
            if param_name not in workflow_params and "value" not in param and "default" not in param:
                found.append(f"entrypoint {entry['name']}: input {param_name!r} is not a workflow argument")

    for name, template in by_name.items():
        where = f"template {name}"
        inputs = set(template_inputs(template))
        # every field but the DAG's tasks (checked below with the tasks' scope) and the metrics
        for ref in _references({k: v for k, v in template.items() if k not in ("dag", "metrics", "outputs")}):
            found += _check_reference(ref, where, inputs=inputs, workflow_params=workflow_params)
        for ref in _references(template.get("metrics") or {}):
            found += _check_reference(ref, f"{where} metrics", inputs=inputs, workflow_params=workflow_params,
                                      own_outputs=template_outputs(template))
        for part in ("container", "script"):
            if part in template:
                for mount in template[part].get("volumeMounts") or []:
                    if mount["name"] not in volumes | {v["name"] for v in template.get("volumes") or []}:
                        found.append(f"{where}: volume mount {mount['name']!r} names no volume")
        for output in (template.get("outputs") or {}).get("parameters") or []:
            if "valueFrom" in output and not (output["valueFrom"].get("path") or output["valueFrom"].get("expression")
                                              or output["valueFrom"].get("parameter")):
                found.append(f"{where}: output {output['name']!r} has no valueFrom.path")
        for ref in _references(template.get("outputs") or {}):
            found += _check_reference(ref, f"{where} outputs", inputs=inputs, workflow_params=workflow_params)
        dag = template.get("dag")
        if not dag:
            continue
        tasks = dag.get("tasks") or []
        names = [t.get("name") for t in tasks]
        for dup in {n for n in names if names.count(n) > 1}:
            found.append(f"{where}: duplicate task name {dup!r}")
        task_names = set(names)
        for task in tasks:
            tw = f"{where} task {task.get('name')}"
            if "depends" in task:
                bad = [n for n in depends_names(task["depends"]) if n not in task_names]
                results = [t.split(".", 1)[1] for t in DEPENDS_TOKEN.findall(task["depends"]) if "." in t]
                found += [f"{tw}: depends names unknown task {n!r}" for n in bad]
                found += [f"{tw}: depends uses unknown result {r!r}" for r in results if r not in TASK_RESULTS]
            for dep in task.get("dependencies") or []:
                if dep not in task_names:
                    found.append(f"{tw}: dependencies names unknown task {dep!r}")
            target = task.get("template")
            if target not in by_name:
                found.append(f"{tw}: no template named {target!r}")
        try:
            topological_order(tasks)
        except ValueError as exc:
            found.append(f"{where}: {exc}")
            continue
        before = ancestors(tasks)
        outputs_of = {t["name"]: template_outputs(by_name.get(t.get("template"), {})) for t in tasks}
        dag_inputs = set(template_inputs(template))
        for task in tasks:
            tw = f"{where} task {task['name']}"
            target = by_name.get(task.get("template"))
            given = {p["name"] for p in (task.get("arguments") or {}).get("parameters") or []}
            if target is not None:
                declared = template_inputs(target)
                needed = {n for n, p in declared.items() if "value" not in p and "default" not in p}
                found += [f"{tw}: missing argument {n!r} for template {target['name']!r}" for n in sorted(needed - given)]
                found += [f"{tw}: argument {n!r} is not an input of template {target['name']!r}"
                          for n in sorted(given - set(declared))]
            for ref in _references(task):
                found += _check_reference(ref, tw, inputs=dag_inputs, workflow_params=workflow_params,
                                          outputs_of=outputs_of, before=before[task["name"]])
    return found


def _name_problems(spec: dict[str, Any], templates: dict[str, dict[str, Any]]) -> list[str]:
    """Names Kubernetes or Argo would refuse at submit or run time (``docker-config-acr.push``)."""
    found = []
    volume_names = [("volumes", v.get("name", "")) for v in spec.get("volumes") or []]
    volume_names += [("volumeClaimTemplates", c.get("metadata", {}).get("name", ""))
                     for c in spec.get("volumeClaimTemplates") or []]
    for name, template in templates.items():
        if len(name) > ARGO_NAME_MAX or not ARGO_NAME.match(name):
            found.append(f"template {name}: invalid template name (letters, digits and '-', at most 128)")
        volume_names += [(f"template {name} volumes", v.get("name", "")) for v in template.get("volumes") or []]
        for part in ("container", "script"):
            volume_names += [(f"template {name} volumeMounts", v.get("name", ""))
                             for v in (template.get(part) or {}).get("volumeMounts") or []]
        for task in (template.get("dag") or {}).get("tasks") or []:
            task_name = task.get("name", "")
            if len(task_name) > ARGO_NAME_MAX or not ARGO_NAME.match(task_name):
                found.append(f"template {name} task {task_name}: invalid task name (letters, digits and '-')")
    empty_dirs = [("volumes", v) for v in spec.get("volumes") or []]
    empty_dirs += [(f"template {n} volumes", v) for n, t in templates.items() for v in t.get("volumes") or []]
    for where, volume in empty_dirs:
        if "emptyDir" in volume and not (volume["emptyDir"] or {}).get("sizeLimit"):
            found.append(f"{where}: emptyDir {volume.get('name')!r} has no sizeLimit (it could fill the node's disk)")
    metrics = [("workflow metrics", p) for p in (spec.get("metrics") or {}).get("prometheus") or []]
    metrics += [(f"template {n} metrics", p) for n, t in templates.items()
                for p in (t.get("metrics") or {}).get("prometheus") or []]
    for where, metric in metrics:
        if not PROMETHEUS_NAME.match(metric.get("name", "")):
            found.append(f"{where}: invalid metric name {metric.get('name')!r} (letters, digits and '_')")
        if not metric.get("help"):
            found.append(f"{where}: metric {metric.get('name')!r} has no help (Argo requires one)")
        for label in metric.get("labels") or []:
            if not PROMETHEUS_NAME.match(label.get("key", "")) or not label.get("value"):
                found.append(f"{where}: metric {metric.get('name')!r} label {label.get('key')!r} is invalid or empty")
    for where, volume in volume_names:
        if not is_dns1123_label(volume):
            found.append(f"{where}: {volume!r} is not a valid volume name (DNS-1123 label: a-z, 0-9, '-', "
                         "at most 63 characters)")
    return sorted(set(found), key=found.index)


def check(manifest: dict[str, Any]) -> None:
    found = problems(manifest)
    if found:
        raise StructureError(found)
