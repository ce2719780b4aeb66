"""Roll out the chat service for a Workspace (``python -m steps.deploy --mode {local,cluster}``).

One output, ``service-url``. The step only reads its flags and hands over:

* ``--mode local`` → :mod:`steps.deploy.local` (``bentoml serve`` on this machine, supervised by
  :mod:`steps.deploy.local_service`; the server outlives the step, ``kaiflow stop`` ends it);
* ``--mode cluster`` → :mod:`steps.deploy.cluster` (a Deployment and a Service from
  :mod:`steps.deploy.manifests`, server-side applied, then the rollout is waited for).

``--workspace-name``, ``--preset``, ``--adapter NAME:STRENGTH`` and ``--ready-timeout`` mean the
same in both modes; the other flags belong to one mode (``--help`` groups them).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from stepkit.common import (
    StepError,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    write_output,
)
from steps.deploy.cluster import ClusterOptions, cluster_deployment, deploy_cluster
from steps.deploy.local import LocalOptions, deploy_local


@dataclass(frozen=True)
class DeployConfig:
    mode: str = field(default="local", metadata={"help": "local: bentoml serve here; cluster: Deployment + Service",
                                                 "choices": ("local", "cluster")})
    workspace_name: str = field(default="", metadata={"help": "the Workspace's name (names the Service)"})
    preset: str = field(default="", metadata={"help": "model preset name (run locally, a model folder works too)"})
    adapter: tuple[str, ...] = field(default=(), metadata={
        "help": "NAME:STRENGTH of an adapter to serve (repeat; strength defaults to 1)", "metavar": "NAME:STRENGTH"})
    ready_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for readiness"})


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per field of the three configs (help texts from the field metadata)."""
    parser = argparse.ArgumentParser(prog="python -m steps.deploy", description=__doc__.splitlines()[0])
    add_dataclass_arguments(parser, DeployConfig)
    add_dataclass_arguments(parser.add_argument_group("local mode"), LocalOptions)
    add_dataclass_arguments(parser.add_argument_group("cluster mode"), ClusterOptions)
    add_common_arguments(parser)
    return parser


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


def run(config: DeployConfig, local: LocalOptions, cluster: ClusterOptions) -> str:
    if not config.workspace_name:
        raise StepError("--workspace-name is required")
    if not config.preset:
        raise StepError("--preset is required")
    strengths = parse_strengths(config.adapter)
    if config.mode == "cluster":
        deployment = cluster_deployment(config.workspace_name, config.preset, strengths, cluster)
        return deploy_cluster(deployment, config.ready_timeout, kubeconfig=cluster.kubeconfig)
    return deploy_local(config.workspace_name, config.preset, strengths, local, config.ready_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = run(dataclass_from_args(DeployConfig, args), dataclass_from_args(LocalOptions, args),
              dataclass_from_args(ClusterOptions, args))
    write_output(args.outputs, "service-url", url)
    print(url)
    return 0

