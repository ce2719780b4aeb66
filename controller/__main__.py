"""``python -m controller [options]`` (what ``kaiflow controller`` runs): the kopf operator."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from controller.options import parse
from stepkit.common import StepError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse(argv)
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.kubeconfig:
        os.environ["KUBECONFIG"] = options.kubeconfig
    # Imported only now: the kubernetes client reads $KUBECONFIG when first imported (kopf and
    # controller.operator import it).
    import kopf

    from controller.operator import registry

    kopf.configure(verbose=options.verbose, log_prefix=True)
    if not options.verbose:
        # kopf logs every handler call at INFO; kaiflow's own decisions stay visible.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("kaiflow").setLevel(logging.DEBUG if options.verbose else logging.INFO)
    reg, _ = registry(options)
    liveness = f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None
    try:
        kopf.run(
            registry=reg, standalone=True, clusterwide=options.watches_all_namespaces,
            namespaces=list(options.namespace), liveness_endpoint=liveness,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
