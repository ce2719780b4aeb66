"""``python -m steps.provision``: the CLI, built from the config dataclasses (see DEVELOPERS.md).

Outputs: ``nodes`` (JSON list of node names) and ``provider``. The full result (with the
provider's details, e.g. the host report or the agent pool) is printed as one JSON line.

Exit codes (``steps.common.run_step``): 0 done; 2 bad input or a failure only a person can fix
(``StepError``, the pipeline does not retry it); 1 a failure that may pass (``RetryableError``:
timeout, no capacity, API unavailable), which the pipeline's retry strategy retries after a backoff.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from steps.common import add_common_arguments, add_dataclass_arguments, dataclass_from_args, run_step, write_output
from steps.provision import provision
from steps.provision.aks import AKS_ENV, AKSOptions
from steps.provision.base import ProvisionConfig
from steps.provision.karpenter import KarpenterOptions

OPTIONS = {"aks": AKSOptions, "karpenter": KarpenterOptions}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m steps.provision",
        description="Provision the GPU nodes a Workspace runs on and report their names.",
    )
    add_common_arguments(parser)
    add_dataclass_arguments(parser, ProvisionConfig)
    add_dataclass_arguments(parser.add_argument_group("aks provider"), AKSOptions, env=AKS_ENV)
    add_dataclass_arguments(parser.add_argument_group("karpenter provider"), KarpenterOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = dataclass_from_args(ProvisionConfig, args)
    options_class = OPTIONS.get(config.provider)
    options = dataclass_from_args(options_class, args) if options_class else None
    result = provision(config, options)
    write_output(args.outputs, "nodes", result.nodes)
    write_output(args.outputs, "provider", result.provider)
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(run_step(main))
