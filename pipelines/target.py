"""Where a pipeline runs: the one place where an Argo cluster and this machine differ.

Every DAG is defined once, in ``pipelines.dags`` and ``pipelines.tasks``. The builder takes a
``Target`` and asks it for everything that is not the same in both places: two small types behind
one interface, ``ClusterTarget`` and ``LocalTarget`` (``Target.cluster(...)``/``Target.local(...)``
make them); nothing else in
``pipelines/`` tests which mode it is in except to leave out Kubernetes-only scheduling fields
(resources, tolerations, volumes), which the local runner would ignore anyway.

=====================  ==================================  =====================================
what                   cluster (Argo)                      local (``kaiflow run``)
=====================  ==================================  =====================================
provision provider     ``$KAIFLOW_PROVISIONER`` (aks)      ``local`` (reports this host)
deploy mode            ``--mode cluster``                  ``--mode local`` (bentoml serve)
data passed on         PVC from volumeClaimTemplates       ``<workdir>/data``
                       mounted at ``/kaiflow/data``
output parameters      ``/tmp/kaiflow/outputs/<name>``     ``<workdir>/outputs/<task>/<name>``
                       (one pod per task)                  (``{{pod.name}}`` = the task)
docker config          imagePushSecret mounted as a        a file given to the runner (or none)
                       volume, ``config.json``
training config        ConfigMap mounted as a volume       a file path, relative to the
                                                           Workspace file's folder
``file:`` dataset URLs as written (a path in the pod)      relative paths made absolute against
                                                           the Workspace file's folder
insecure registries    ``$KAIFLOW_INSECURE_REGISTRIES``    plus 127.0.0.1 and localhost
=====================  ==================================  =====================================
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

from pipelines.images import Images

CLUSTER_DATA_ROOT = "/kaiflow/data"
CLUSTER_OUTPUTS_DIR = "/tmp/kaiflow/outputs"
CLUSTER_DOCKER_CONFIG_DIR = "/kaiflow/docker-config"
CLUSTER_TRAINING_CONFIG_DIR = "/kaiflow/training-config"
CLUSTER_DATASET_URLS_DIR = "/kaiflow/dataset-urls"
TRAINING_CONFIG_KEY = "training_config.yaml"
LOCAL_REGISTRY_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Target(ABC):
    """What the DAG builder asks of the place a pipeline runs."""

    data_root: str = field(metadata={"help": "folder the tasks pass datasets, adapters and checkpoints through"})
    outputs_dir: str = field(metadata={"help": "folder each task writes its output parameters to"})
    provider: str = field(metadata={"help": "provision provider (local, aks, karpenter, existing)"})
    images: Images = field(default_factory=Images, metadata={"help": "pipeline and serving images"})
    insecure_registries: tuple[str, ...] = field(
        default=(), metadata={"help": "registry hosts reached over plain http (host or host:port)"}
    )
    is_cluster: ClassVar[bool]
    deploy_mode: ClassVar[str]  # the deploy step's --mode

    @staticmethod
    def cluster(images: Images | None = None, provider: str | None = None,
                insecure_registries: tuple[str, ...] | None = None, allow_http_datasets: bool = False,
                dataset_block_cidrs: tuple[str, ...] = (), dataset_allow_cidrs: tuple[str, ...] = (),
                allow_remote_code: bool = False,
                dataset_urls_secret: str | None = None) -> ClusterTarget:
        env_insecure = tuple(h for h in os.environ.get("KAIFLOW_INSECURE_REGISTRIES", "").split(",") if h)
        return ClusterTarget(
            data_root=CLUSTER_DATA_ROOT,
            outputs_dir=CLUSTER_OUTPUTS_DIR,
            provider=provider or os.environ.get("KAIFLOW_PROVISIONER") or "aks",
            images=images or Images.from_env(),
            insecure_registries=insecure_registries if insecure_registries is not None else env_insecure,
            allow_http_datasets=allow_http_datasets,
            dataset_block_cidrs=tuple(dataset_block_cidrs),
            dataset_allow_cidrs=tuple(dataset_allow_cidrs),
            allow_remote_code=allow_remote_code,
            dataset_urls_secret=dataset_urls_secret,
        )

    @staticmethod
    def local(workdir: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None,
              port: int | None = None, docker_config_file: str | os.PathLike[str] | None = None,
              images: Images | None = None) -> LocalTarget:
        root = Path(workdir).resolve()
        return LocalTarget(
            data_root=str(root / "data"),
            outputs_dir=str(root / "outputs" / "{{pod.name}}"),
            provider="local",
            images=images or Images(),
            insecure_registries=LOCAL_REGISTRY_HOSTS,
            docker_config_file=str(docker_config_file) if docker_config_file else None,
            base_dir=str(Path(base_dir).resolve()) if base_dir else None,
            workdir=str(root),
            port=port,
        )

    # -- what differs -------------------------------------------------------------------------

    @abstractmethod
    def dataset_url(self, url: str) -> str:
        """The URL the fetch step is given for a ``tuning.input.urls`` entry."""

    @abstractmethod
    def training_config(self, config: str | None) -> str | None:
        """The file the tune step reads for ``tuning.config`` (None: none)."""

    @abstractmethod
    def docker_config(self, secret_name: str | None) -> str | None:
        """Path of the docker config a registry step reads for ``secret_name`` (None: anonymous)."""

    # -- the same in both ---------------------------------------------------------------------

    def is_insecure(self, image: str) -> bool:
        host = image.split("/", 1)[0]
        return host in self.insecure_registries or host.split(":", 1)[0] in self.insecure_registries

    def data(self, *parts: str) -> str:
        return "/".join([self.data_root.rstrip("/"), *parts])

    def output_path(self, name: str) -> str:
        return f"{self.outputs_dir}/{name}"


@dataclass(frozen=True)
class ClusterTarget(Target):
    """Argo on Kubernetes: a PVC for data, mounted Secrets and ConfigMaps."""

    allow_http_datasets: bool = field(default=False, metadata={
        "help": "the admin allows plain http dataset URLs (fetch_dataset --allow-http)"})
    allow_remote_code: bool = field(default=False, metadata={
        "help": "the admin allows ModelConfig.trust_remote_code for this Workflow's namespace or model"})
    dataset_urls_secret: str | None = field(default=None, metadata={
        "help": "a Secret holding the dataset URLs (key DATASET_URLS_SECRET_KEY): the fetch step reads them from a "
                "mounted file, so signed URLs stay out of the Workflow spec and the pod's arguments"})
    dataset_block_cidrs: tuple[str, ...] = field(default=(), metadata={
        "help": "address ranges dataset downloads may never reach besides the non-public ones "
                "(the cluster's service and pod CIDRs when they are public addresses)"})
    dataset_allow_cidrs: tuple[str, ...] = field(default=(), metadata={
        "help": "address ranges dataset downloads may reach although not public (an in-house mirror the admin "
                "names; fetch_dataset --allow-cidr)"})
    training_config_text: str | None = field(default=None, metadata={
        "help": "the training_config.yaml of tuning.config's ConfigMap, carried inside the Workflow (a raw input "
                "artifact at the path the ConfigMap volume would have used) instead of mounting the ConfigMap: "
                "`kaiflow render` sets it when the Workspace's file has the ConfigMap, so `argo submit` of the "
                "Workflow alone needs no ConfigMap; None (the controller): the ConfigMap is mounted"})
    is_cluster: ClassVar[bool] = True
    deploy_mode: ClassVar[str] = "cluster"

    def dataset_url(self, url: str) -> str:
        return url

    def training_config(self, config: str | None) -> str | None:
        return None if config is None else f"{CLUSTER_TRAINING_CONFIG_DIR}/{TRAINING_CONFIG_KEY}"

    def docker_config(self, secret_name: str | None) -> str | None:
        return None if secret_name is None else f"{CLUSTER_DOCKER_CONFIG_DIR}/{secret_name}/config.json"


@dataclass(frozen=True)
class LocalTarget(Target):
    """``kaiflow run``: a work folder, files given by path, the chat service on a local port."""

    docker_config_file: str | None = field(
        default=None, metadata={"help": "docker config file used for imagePushSecret/imagePullSecrets"}
    )
    base_dir: str | None = field(
        default=None, metadata={"help": "folder relative file: URLs and tuning.config resolve against"}
    )
    workdir: str | None = field(default=None, metadata={"help": "the runner's work folder"})
    port: int | None = field(default=None, metadata={"help": "port the chat service listens on"})
    is_cluster: ClassVar[bool] = False
    deploy_mode: ClassVar[str] = "local"

    def dataset_url(self, url: str) -> str:
        """``file:data/x.parquet`` becomes an absolute ``file:///.../data/x.parquet``."""
        parsed = urlparse(url)
        if parsed.scheme != "file" or parsed.netloc or parsed.path.startswith("/"):
            return url
        return Path(self.base_dir or ".").resolve().joinpath(parsed.path).as_uri()

    def training_config(self, config: str | None) -> str | None:
        if config is None:
            return None
        path = Path(config)
        return str(path if path.is_absolute() else Path(self.base_dir or ".").resolve() / path)

    def docker_config(self, secret_name: str | None) -> str | None:
        return None if secret_name is None else self.docker_config_file
