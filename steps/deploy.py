"""Roll out the chat service for a Workspace (`python -m steps.deploy`).

Two modes, one output (``service-url``):

* ``--mode local`` starts ``bentoml serve serving_bento.service:KaiflowChat`` on this machine as
  a process group of its own (BentoML's supervisor keeps its worker alive), waits for
  ``/readyz`` under a deadline, and writes ``<workdir>/service.json`` (url, pid, log path, ...).
  A service already running from the same workdir is replaced (a scheduled run redeploys).
  The server outlives the step; :func:`stop_local` (``kaiflow stop``) ends it and :func:`chat`
  (``kaiflow chat "question"``) talks to it. If the server exits or reports a failed model load
  (``/livez`` 503) before it is ready, the step fails with the tail of its log.
* ``--mode cluster`` renders a Deployment and a Service (:mod:`steps.deploy_manifests`), applies
  them with the ``kubernetes`` client (create, or strategic-merge patch when they exist), and
  waits under a deadline until the Deployment reports ``readyReplicas`` — the pods' readiness
  probe is the service's ``/readyz``, so ready means model and adapters loaded.

Exit codes: in cluster mode a readiness deadline that passes, a 429/5xx answer or an unreachable
API server exit 1 (``RetryableError``: the pipeline retries the step); bad flags and other API
answers (403, 404, 422, ...) exit 2. In local mode every failure exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.common import (
    RetryableError,
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    run_step,
    write_output,
)
from steps.deploy_manifests import (
    SERVICE_IMPORT,
    AdapterImage,
    ClusterDeployment,
    render_deployment,
    render_service,
    service_url,
)

log = logging.getLogger("kaiflow.steps.deploy")

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_FILE = "service.json"
LOG_FILE = "service.log"


@dataclass
class DeployConfig:
    mode: str = field(default="local", metadata={"help": "local: bentoml serve here; cluster: Deployment + Service",
                                                 "choices": ("local", "cluster")})
    workspace_name: str = field(default="", metadata={"help": "the Workspace's name (names the Service)"})
    preset: str = field(default="", metadata={"help": "model preset name, or a local model folder (local mode)"})
    adapters_dir: str = field(default="", metadata={"help": "local mode: folder of pulled adapters (<dir>/<name>)"})
    adapter: list[str] = field(default_factory=list, metadata={
        "help": "NAME:STRENGTH of an adapter (repeat); local mode reads <adapters-dir>/NAME"})
    adapter_image: list[str] = field(default_factory=list, metadata={
        "help": "cluster mode: NAME=IMAGE for the init container that pulls adapters (repeat)"})
    workdir: str = field(default=".kaiflow/serve", metadata={"help": "local mode: where service.json and the log go"})
    host: str = field(default="127.0.0.1", metadata={"help": "local mode: address to listen on"})
    port: int = field(default=0, metadata={"help": "local mode: port; 0 picks a free one"})
    engine: str = field(default="batching", metadata={"help": "generate loop: batching or naive",
                                                      "choices": ("batching", "naive")})
    namespace: str = field(default="default", metadata={"help": "cluster mode: namespace"})
    image: str = field(default="", metadata={"help": "cluster mode: the kaiflow serving image"})
    workspace_uid: str = field(default="", metadata={"help": "cluster mode: the Workspace's uid (owner reference)"})
    gpus: int = field(default=1, metadata={"help": "cluster mode: GPUs per pod (nvidia.com/gpu)"})
    replicas: int = field(default=1, metadata={"help": "cluster mode: pods"})
    node_label: list[str] = field(default_factory=list, metadata={
        "help": "cluster mode: k=v from the Workspace's resource.labelSelector.matchLabels (repeat)"})
    docker_config_secret: str = field(default="", metadata={
        "help": "cluster mode: dockerconfigjson Secret for pulling adapters"})
    api_key_secret: str = field(default="", metadata={
        "help": "cluster mode: Secret whose key 'api-key' becomes the service's bearer key"})
    insecure: bool = field(default=False, metadata={"help": "pull adapters over plain http"})
    ready_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for readiness"})


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per DeployConfig field (help texts from the field metadata)."""
    parser = argparse.ArgumentParser(prog="python -m steps.deploy", description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, DeployConfig)
    add_common_arguments(parser)
    return parser


# ---------------------------------------------------------------------------- parsing flags


def parse_strengths(items: Sequence[str]) -> dict[str, float]:
    strengths: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not name:
            raise StepError(f"--adapter {item!r}: expected NAME:STRENGTH")
        try:
            strength = float(value) if sep else 1.0
        except ValueError:
            raise StepError(f"--adapter {item!r}: strength {value!r} is not a number") from None
        if strength < 0:
            raise StepError(f"--adapter {item!r}: strength must be >= 0")
        strengths[name] = strength
    return strengths


def parse_pairs(items: Sequence[str], flag: str, sep: str = "=") -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key or not value:
            raise StepError(f"{flag} {item!r}: expected KEY{sep}VALUE")
        pairs[key] = value
    return pairs


def local_adapters(config: DeployConfig) -> list[dict[str, Any]]:
    """The KAIFLOW_ADAPTERS list for a local run: every named adapter, or all under the folder."""
    strengths = parse_strengths(config.adapter)
    if not config.adapters_dir:
        if strengths:
            raise StepError("--adapter needs --adapters-dir in local mode (where the pulled adapters are)")
        return []
    root = Path(config.adapters_dir)
    if not root.is_dir():
        raise StepError(f"--adapters-dir {root}: no such folder")
    names = list(strengths) or sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not names:
        raise StepError(f"--adapters-dir {root}: holds no adapter folders (with adapter_config.json)")
    adapters = []
    for name in names:
        path = root / name
        if not (path / "adapter_config.json").is_file():
            raise StepError(f"--adapter {name}: {path} holds no adapter_config.json")
        adapters.append({"name": name, "path": str(path.resolve()), "strength": strengths.get(name, 1.0)})
    return adapters


# ---------------------------------------------------------------------------- local mode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def service_env(model: str, adapters: list[dict[str, Any]], engine: str = "batching",
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KAIFLOW_MODEL": model,
        "KAIFLOW_ENGINE": engine,
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    })
    if adapters:
        env["KAIFLOW_ADAPTERS"] = json.dumps(adapters)
    else:
        env.pop("KAIFLOW_ADAPTERS", None)
    env.update(extra or {})
    return env


@dataclass
class LocalService:
    url: str
    pid: int
    workdir: Path
    process: subprocess.Popen | None = None  # set only in the process that started it

    @property
    def log_path(self) -> Path:
        return self.workdir / LOG_FILE


def listeners_on(port: int) -> int:
    """Listening TCP sockets on ``port`` (BentoML binds with SO_REUSEPORT, so two servers can share one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                count += 1
    return count


def start_local(model: str, workdir: str | os.PathLike[str], *, adapters: list[dict[str, Any]] | None = None,
                host: str = "127.0.0.1", port: int = 0, engine: str = "batching", ready_timeout: float = 600.0,
                extra_env: dict[str, str] | None = None, workspace_name: str = "") -> LocalService:
    """Start ``bentoml serve`` in its own process group and wait until /readyz answers 200.

    BentoML listens with SO_REUSEPORT: a second server that happens to start on the same port
    (another test session on a shared machine) would silently share its traffic. A port we picked
    ourselves is therefore checked to have exactly one listener, and picked again if not.
    """
    existing = read_service_file(workdir)
    if existing and _pid_is_bento(existing.get("pid", -1)):
        # a new rollout replaces the old one, as a Deployment update does (scheduled runs redeploy)
        log.info("replacing the service running from %s (pid %s)", workdir, existing["pid"])
        stop_local(workdir)
    if port and listeners_on(port):
        raise StepError(f"--port {port}: another process already listens there")
    for _attempt in range(3):
        service = _start_local_once(model, workdir, adapters=adapters, host=host, port=port, engine=engine,
                                    ready_timeout=ready_timeout, extra_env=extra_env, workspace_name=workspace_name)
        bound = int(service.url.rsplit(":", 1)[1])
        if listeners_on(bound) <= 1:
            return service
        stop_local(workdir, service)
        if port:
            raise StepError(f"--port {port}: another server started listening there too")
        log.warning("another server also listens on port %d; starting again on another port", bound)
    raise StepError("could not get a port of our own for the service (3 tries)")


def _start_local_once(model: str, workdir: str | os.PathLike[str], *, adapters: list[dict[str, Any]] | None,
                      host: str, port: int, engine: str, ready_timeout: float, extra_env: dict[str, str] | None,
                      workspace_name: str) -> LocalService:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log_path = workdir / LOG_FILE
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT, "--host", host, "--port", str(port)]
    env = service_env(model, adapters or [], engine, extra_env)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    service = LocalService(url=url, pid=process.pid, workdir=workdir, process=process)
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            code = process.poll()
            if code is not None:
                raise StepError(f"the service exited with code {code} before it was ready; log tail:\n"
                                f"{log_tail(log_path)}")
            if _http_status(f"{url}/livez") == 503:
                raise StepError(f"the service failed to load its model; log tail:\n{log_tail(log_path)}")
            if _http_status(f"{url}/readyz") == 200:
                break
            if time.monotonic() > deadline:
                raise StepError(f"the service was not ready after {ready_timeout:.0f} s; log: {log_path}")
            time.sleep(0.5)
    except BaseException:
        _terminate(process.pid, process)
        raise
    info = {"url": url, "pid": process.pid, "host": host, "port": port, "model": model,
            "adapters": adapters or [], "engine": engine, "log": str(log_path),
            "workspace": workspace_name, "started_at": time.time()}
    tmp = workdir / (SERVICE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(workdir / SERVICE_FILE)
    return service


def read_service_file(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(workdir) / SERVICE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_is_bento(pid: int) -> bool:
    """Guard against a recycled pid: only signal a process that is really our bentoml server."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bentoml" in cmdline and SERVICE_IMPORT.encode() in cmdline


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (BentoML's workers run in process groups of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields_after_name[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _terminate(pid: int, process: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """SIGTERM the server (its supervisor stops the workers), SIGKILL whatever is left after ``timeout``."""
    workers = _children(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                break
        elif not _pid_is_bento(pid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if process is not None:
            process.wait(5)
    for worker in workers:  # normally gone with the supervisor; never left running
        if _pid_is_bento(worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def stop_local(workdir: str | os.PathLike[str] = ".kaiflow/serve", service: LocalService | None = None) -> bool:
    """Stop the local service started from ``workdir``; False when none was running."""
    workdir = Path(workdir)
    info = read_service_file(workdir)
    pid = service.pid if service else (info or {}).get("pid")
    stopped = False
    if pid and (service is not None or _pid_is_bento(pid)):
        _terminate(pid, service.process if service else None)
        stopped = True
    (workdir / SERVICE_FILE).unlink(missing_ok=True)
    return stopped


def chat(url_or_workdir: str | os.PathLike[str], prompt: str, *, max_new_tokens: int = 256,
         temperature: float = 0.7, api_key: str | None = None, timeout: float = 300.0) -> str:
    """One question to a running service's Kaito ``/chat``; returns the answer text."""
    import httpx

    target = str(url_or_workdir)
    if not target.startswith(("http://", "https://")):
        info = read_service_file(target)
        if info is None:
            raise StepError(f"no running service recorded in {target}/{SERVICE_FILE}; deploy first")
        target = info["url"]
    api_key = api_key if api_key is not None else os.environ.get("KAIFLOW_API_KEY", "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"messages": [{"role": "user", "content": prompt}],
            "generate_kwargs": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                "do_sample": temperature > 0}}
    try:
        response = httpx.post(f"{target.rstrip('/')}/chat", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise StepError(f"cannot reach the service at {target}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise StepError(f"the service answered {response.status_code}: {message}")
    return response.json()["Result"]


# ---------------------------------------------------------------------------- cluster mode


def cluster_deployment(config: DeployConfig) -> ClusterDeployment:
    if not config.image:
        raise StepError("--image is required in cluster mode (the kaiflow serving image)")
    strengths = parse_strengths(config.adapter)
    images = parse_pairs(config.adapter_image, "--adapter-image")
    missing = sorted(set(strengths) - set(images))
    if missing:
        raise StepError(f"--adapter {missing[0]}: no --adapter-image {missing[0]}=IMAGE to pull it from")
    adapters = tuple(AdapterImage(name, image, strengths.get(name, 1.0)) for name, image in images.items())
    if config.gpus < 0 or config.replicas < 1:
        raise StepError("--gpus must be >= 0 and --replicas >= 1")
    return ClusterDeployment(
        workspace_name=config.workspace_name, namespace=config.namespace, preset=config.preset,
        image=config.image, workspace_uid=config.workspace_uid, adapters=adapters, gpus=config.gpus,
        replicas=config.replicas, node_labels=parse_pairs(config.node_label, "--node-label"),
        docker_config_secret=config.docker_config_secret, api_key_secret=config.api_key_secret,
        insecure_registry=config.insecure,
    )


def kube_api_client() -> Any:
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config()
            from kubernetes import client

            return client.ApiClient()
        # read KUBECONFIG now: the client library fixes its default path when first imported
        return kube_config.new_client_from_config(config_file=os.environ.get("KUBECONFIG", "~/.kube/config"))
    except (ConfigException, OSError) as exc:
        raise StepError(f"no Kubernetes credentials (in-cluster or KUBECONFIG): {exc}") from None


def api_failure(exc: Any, message: str) -> StepError:
    """A Kubernetes API error as a step error: 429 and 5xx may pass (exit 1), other answers will not (exit 2)."""
    status = getattr(exc, "status", None)
    transient = not status or status == 429 or status >= 500
    return (RetryableError if transient else StepError)(message)


def apply(create: Any, patch: Any, name: str, namespace: str, body: dict[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        create(namespace, body)
        log.info("created %s %s/%s", body["kind"], namespace, name)
    except ApiException as exc:
        if exc.status != 409:
            raise api_failure(exc, f"creating {body['kind']} {namespace}/{name} failed: "
                                   f"{exc.status} {exc.reason}") from None
        patch(name, namespace, body)
        log.info("updated %s %s/%s", body["kind"], namespace, name)


def deploy_cluster(d: ClusterDeployment, ready_timeout: float, api_client: Any = None, poll: float = 1.0) -> str:
    import urllib3.exceptions
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api_client = api_client or kube_api_client()
    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    deployment, service = render_deployment(d), render_service(d)
    try:
        try:
            apply(apps.create_namespaced_deployment, apps.patch_namespaced_deployment, d.workspace_name, d.namespace,
                  deployment)
            apply(core.create_namespaced_service, core.patch_namespaced_service, d.workspace_name, d.namespace,
                  service)
        except ApiException as exc:
            raise api_failure(exc, f"applying the manifests failed: {exc.status} {exc.reason}") from None
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                status = apps.read_namespaced_deployment(d.workspace_name, d.namespace).status
            except ApiException as exc:
                raise api_failure(exc, f"reading Deployment {d.namespace}/{d.workspace_name} failed: "
                                       f"{exc.status} {exc.reason}") from None
            ready = (status.ready_replicas or 0) if status else 0
            if ready >= d.replicas:
                break
            if time.monotonic() > deadline:
                conditions = "; ".join(f"{c.type}={c.status} {c.reason or ''} {c.message or ''}".strip()
                                       for c in ((status.conditions if status else None) or []))
                # Pods still pulling an image or waiting for a GPU node may well be ready on the next try.
                raise RetryableError(f"Deployment {d.namespace}/{d.workspace_name}: {ready}/{d.replicas} replicas "
                                     f"ready after {ready_timeout:.0f} s{'; ' + conditions if conditions else ''}")
            time.sleep(poll)
    except urllib3.exceptions.HTTPError as exc:  # the client's own retries could not reach the API server
        raise RetryableError(f"cannot reach the Kubernetes API: {exc}") from None
    return service_url(d.workspace_name, d.namespace)


# ---------------------------------------------------------------------------- the step


def run(config: DeployConfig) -> str:
    if not config.workspace_name:
        raise StepError("--workspace-name is required")
    if not config.preset:
        raise StepError("--preset is required")
    if config.mode == "cluster":
        return deploy_cluster(cluster_deployment(config), config.ready_timeout)
    from presets.catalog import UnknownPresetError, get_preset

    if not Path(config.preset).is_dir():
        try:
            get_preset(config.preset)
        except UnknownPresetError as exc:
            raise StepError(f"--preset: {exc}") from None
    service = start_local(config.preset, config.workdir, adapters=local_adapters(config), host=config.host,
                          port=config.port, engine=config.engine, ready_timeout=config.ready_timeout,
                          workspace_name=config.workspace_name)
    return service.url


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = run(dataclass_from_args(DeployConfig, args))
    write_output(args.outputs, "service-url", url)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
