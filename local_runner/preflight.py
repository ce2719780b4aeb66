"""What ``kaiflow run`` checks before the first task: everything the DAG needs outside itself.

A local run used to spend its time first (fetch, tune) and fail later (push to a registry that
was not there). ``check(manifest, workdir, parameters)`` reads the manifest the runner executes,
with the workflow arguments it will use (``-p``), and checks:

* **registries** each image the DAG pushes to or pulls from lives on (``--image``,
  ``--current-image``, ``--adapter NAME=IMAGE``): a registry answering ``GET /v2/`` (200, or 401
  asking for credentials). The local default, ``127.0.0.1:5000`` (or ``localhost:5000``), is
  started when nothing answers there, by the same code as ``kaiflow registry`` with its default
  storage (``.kaiflow/registry``), for the length of the run; any other address must answer.
* **datasets** (``fetch-dataset --url``): a ``file:`` URL names a readable file; an http(s) URL
  answers (a ``HEAD``; 404 and 410 refused, anything else is left to the step, which has retries);
  the training config file (``--config``) exists.
* **disk** where the workdir lives: the model's weights at 16 bits (parameters × 2 bytes; the
  adapter, checkpoints and the merged service model stay well below that) plus ``SPARE_BYTES``
  for the dataset, checkpoints and logs. A model of unknown size is not checked.

Every problem is reported with its fix, all at once (``PreflightError``), before any task runs.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from local_runner.expressions import ExpressionError, substitute
from local_runner.local_registry import (
    DEFAULT_PORT,
    LOCAL_HOSTS,
    LocalRegistryError,
    RegistryProcess,
    ensure_local_registry,
    registry_answers,
)
from pipelines.names import TASK_FETCH_DATASET
from pipelines.structure import workflow_spec
from presets import UnknownPresetError, get_preset

SPARE_BYTES = 1 << 30
# Where `kaiflow registry` keeps its storage by default; a registry started here uses the same.
REGISTRY_ROOT = Path(".kaiflow") / "registry"
REMOTE_TIMEOUT_S = 10.0
IMAGE_FLAGS = ("--image", "--current-image")


class PreflightError(Exception):
    """Something the DAG needs is missing; one line per problem, each with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("before the first task, kaiflow run found:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Preflight:
    """What the checks found; ``started`` is a registry this run started (stop it when the run ends)."""

    registries: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    disk_needed: int | None = None
    disk_free: int | None = None
    started: RegistryProcess | None = None

    def stop(self) -> None:
        if self.started is not None:
            self.started.stop()
            self.started = None


def _arguments(manifest: dict[str, Any], parameters: dict[str, str] | None) -> dict[str, str]:
    spec = workflow_spec(manifest)
    values = {p["name"]: str(p.get("value", "")) for p in (spec.get("arguments") or {}).get("parameters") or []}
    return values | {k: str(v) for k, v in (parameters or {}).items()}


def _flag_values(manifest: dict[str, Any], scope: dict[str, str], only: str | None = None) -> dict[str, list[str]]:
    """Each container flag's values across the templates (or template ``only``), workflow arguments filled in."""
    found: dict[str, list[str]] = {}
    for template in workflow_spec(manifest).get("templates") or []:
        if only is not None and template.get("name") != only:
            continue
        args = [str(a) for a in ((template.get("container") or {}).get("args") or [])]
        for flag, value in zip(args, args[1:]):
            if not flag.startswith("--"):
                continue
            try:
                value = substitute(value, scope, template.get("name", ""))
            except ExpressionError:  # a task output, known only at run time
                continue
            found.setdefault(flag, []).append(value)
    return found


def _registry_host(image: str) -> str:
    return image.split("/", 1)[0]


def _remote_registry_answers(host: str) -> str | None:
    """None when ``https://host/v2/`` answers as a registry; else why not."""
    try:
        urllib.request.urlopen(f"https://{host}/v2/", timeout=REMOTE_TIMEOUT_S).close()
        return None
    except urllib.error.HTTPError as exc:
        return None if exc.code == 401 else f"GET https://{host}/v2/ answered {exc.code}"
    except OSError as exc:
        return f"cannot reach https://{host}/v2/ ({getattr(exc, 'reason', exc)})"


def _check_registries(images: list[str], result: Preflight, problems: list[str], start_registry: bool) -> None:
    for host in dict.fromkeys(_registry_host(i) for i in images if i):
        name, _, port = host.rpartition(":")
        if name in LOCAL_HOSTS:
            if registry_answers(f"127.0.0.1:{port}"):
                result.registries.append(f"{host} answers")
                continue
            if start_registry and port == str(DEFAULT_PORT):
                try:
                    result.started = ensure_local_registry(f"127.0.0.1:{port}", REGISTRY_ROOT)
                except LocalRegistryError as exc:
                    problems.append(f"registry {host}: nothing answers and it could not be started: {exc}")
                    continue
                result.registries.append(f"{host} started (storage {REGISTRY_ROOT / 'storage'}, stopped after the run)")
                continue
            problems.append(f"registry {host}: nothing answers there; start one with "
                            f"`kaiflow registry --port {port or DEFAULT_PORT}` in another terminal")
            continue
        why = _remote_registry_answers(host)
        if why is None:
            result.registries.append(f"{host} answers")
        else:
            problems.append(f"registry {host}: {why}; check the address (-p to change a workflow argument) and the network")


def _check_dataset(url: str, result: Preflight, problems: list[str]) -> None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
        if not path.is_file():
            problems.append(f"dataset {url}: no such file {path}; fix tuning.input.urls (relative file: URLs resolve "
                            "against the Workspace file's folder) or pass -p dataset-url=file:///path")
            return
        result.datasets.append(f"{path} ({path.stat().st_size} bytes)")
        return
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(url, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S).close()
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                problems.append(f"dataset {parsed.scheme}://{parsed.netloc}{parsed.path}: {exc.code}; fix the URL")
                return
        except OSError as exc:
            problems.append(f"dataset {parsed.scheme}://{parsed.netloc}{parsed.path}: cannot reach it "
                            f"({getattr(exc, 'reason', exc)})")
            return
        result.datasets.append(f"{parsed.scheme}://{parsed.netloc}{parsed.path} answers")  # no query: signed URLs


def _model_bytes(preset_names: list[str]) -> int | None:
    sizes = []
    for name in dict.fromkeys(preset_names):
        try:
            preset = get_preset(name)
        except UnknownPresetError:
            return None
        if not preset.params_b:
            return None
        sizes.append(int(preset.params_b * 1e9 * 2))
    return max(sizes) if sizes else 0


def check(manifest: dict[str, Any], workdir: str | Path, parameters: dict[str, str] | None = None, *,
          start_registry: bool = True) -> Preflight:
    """Check what the DAG needs; raise ``PreflightError`` listing every problem with its fix."""
    scope = {f"workflow.parameters.{k}": v for k, v in _arguments(manifest, parameters).items()}
    flags = _flag_values(manifest, scope)
    result, problems = Preflight(), []
    images = [v for f in IMAGE_FLAGS for v in flags.get(f, [])]
    images += [v.split("=", 1)[1] for v in flags.get("--adapter", []) if "=" in v]
    _check_registries(images, result, problems, start_registry)
    for url in _flag_values(manifest, scope, only=TASK_FETCH_DATASET).get("--url", []):
        _check_dataset(url, result, problems)
    for config in dict.fromkeys(flags.get("--config", [])):
        if not Path(config).is_file():
            problems.append(f"training config {config}: no such file; fix tuning.config (a path relative to the "
                            "Workspace file's folder in a local run, or a ConfigMap in the same file)")
    needed = _model_bytes(flags.get("--preset", []))
    if needed is not None:
        where = Path(workdir)
        while not where.exists():
            where = where.parent
        result.disk_needed, result.disk_free = needed + SPARE_BYTES, shutil.disk_usage(where).free
        if result.disk_free < result.disk_needed:
            problems.append(f"disk: {result.disk_free / 2**30:.1f} GiB free under {where}, the model and its "
                            f"checkpoints need about {result.disk_needed / 2**30:.1f} GiB; free space or use another --workdir")
    if problems:
        result.stop()
        raise PreflightError(problems)
    return result
