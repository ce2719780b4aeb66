"""``python -m controller [options]`` (what ``kaiflow controller`` runs): the kopf operator."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from controller.leader import LeaderElector, standby_health
from controller.options import ControllerOptions, parse
from stepkit import kube
from stepkit.common import StepError

# Where the install runs the controller (controller/manifests/system/): the Lease's default home.
CONTROLLER_NAMESPACE = "kaiflow-system"


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
    elector = _lead(options) if options.leader_elect else None
    try:
        kopf.run(
            registry=reg, standalone=True, clusterwide=options.watches_all_namespaces,
            namespaces=list(options.namespace), liveness_endpoint=liveness,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0
    finally:
        if elector is not None:
            elector.release()
    return 0


def _lead(options: ControllerOptions) -> LeaderElector:
    """Wait for the Lease (answering /healthz meanwhile), then keep it; losing it ends the process."""
    elector = LeaderElector(
        kube.api_client(options.kubeconfig), options.lease_namespace or os.environ.get("POD_NAMESPACE") or
        CONTROLLER_NAMESPACE, options.lease_name, duration_s=options.lease_duration_s,
        renew_s=max(1.0, options.lease_duration_s / 3), retry_s=max(0.5, min(2.0, options.lease_duration_s / 7)))
    with standby_health(options.liveness_port):
        elector.wait_to_lead()
    # exit code 1 without cleanup: another replica may already act, so nothing more is done here
    elector.keep_leading(lambda: os._exit(1))
    return elector


if __name__ == "__main__":
    sys.exit(main())
