"""``python -m steps.provision``: the CLI, built from the config dataclasses (see DEVELOPERS.md).

Outputs: ``nodes`` (JSON list of node names) and ``provider``. The full result (with the
provider's details, e.g. the host report or the agent pool) is printed as one JSON line.

``--delete`` releases instead what an earlier run made for the Workspace (NodeClaims, the agent
pool) and writes the output ``released`` (JSON list of names); already gone is fine.

Exit codes (``stepkit.common.run_step``): 0 done; 2 bad input or a failure only a person can fix
(``StepError``, the pipeline does not retry it); 1 a failure that may pass (``RetryableError``:
timeout, no capacity, API unavailable), which the pipeline's retry strategy retries after a backoff.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from stepkit.common import add_common_arguments, add_dataclass_arguments, dataclass_from_args, run_step, write_output
from steps.provision import provider_class, provision, release
from steps.provision.aks import AKS_ENV, AKSOptions
from steps.provision.base import ProvisionConfig
from steps.provision.karpenter import KarpenterOptions

OPTIONS = {"aks": AKSOptions, "karpenter": KarpenterOptions}


@dataclass(frozen=True)
class Action:
    delete: bool = field(default=False, metadata={
        "help": "release what provision made for the Workspace (NodeClaims, agent pool) instead; "
                "waits at most --timeout s; output: released"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m steps.provision",
        description="Provision the GPU nodes a Workspace runs on and report their names (or release them).",
    )
    add_common_arguments(parser)
    add_dataclass_arguments(parser, Action)
    add_dataclass_arguments(parser, ProvisionConfig)
    add_dataclass_arguments(parser.add_argument_group("aks provider"), AKSOptions, env=AKS_ENV)
    add_dataclass_arguments(parser.add_argument_group("karpenter provider"), KarpenterOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = dataclass_from_args(ProvisionConfig, args)
    options_class = OPTIONS.get(config.provider)
    options = dataclass_from_args(options_class, args) if options_class else None
    if dataclass_from_args(Action, args).delete:
        provider_class(config.provider)  # an unknown provider is named before anything else
        released = release(config.provider, config.workspace_name, config.namespace, kubeconfig=config.kubeconfig,
                           options=dataclasses.asdict(options) if options else None, timeout=config.timeout,
                           poll_interval=config.poll_interval)
        write_output(args.outputs, "released", released)
        print(json.dumps({"provider": config.provider, "released": released}))
        return 0
    result = provision(config, options)
    write_output(args.outputs, "nodes", result.nodes)
    write_output(args.outputs, "provider", result.provider)
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
