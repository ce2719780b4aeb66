"""``python -m steps.tune``: see DEVELOPERS.md ("Step command lines") and ``steps.tune``."""

import logging
import os
import sys

from stepkit.common import run_step
from steps.tune.parallel import in_worker
from steps.tune.run import main

if __name__ == "__main__":
    code = run_step(main)
    if in_worker():
        # A rank that has finished (its process group destroyed, its files written and closed)
        # leaves without running C++ static destructors: at interpreter exit a torch/gloo thread
        # still joinable made a rank abort now and then ("terminate called without an active
        # exception", SIGABRT after "trained on ..." — seen in CI), which the launcher reported
        # as the step failing. The launcher reads the rank's exit code as usual.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
